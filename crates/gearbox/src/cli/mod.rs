//! The everyday client commands, for any Gearman server: `gearbox submit`, `work`, `admin`,
//! `log`, `dead` and `result`, and `gearbox token` for the access list. This file holds what
//! they share: their runtime and table and JSON output (servers.rs: where and how they
//! connect).

mod admin;
mod dead;
mod log;
mod servers;
mod submit;
mod token;
mod work;

use std::io::Write;

use servers::{admin_line, explain, Servers};

pub use admin::{admin, AdminArgs};
pub use dead::{dead, DeadArgs};
pub use log::{log, result, LogArgs, ResultArgs};
pub use submit::{submit, SubmitArgs};
pub use token::{token, TokenArgs};
pub use work::{work, WorkArgs};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Prints rows as left-aligned columns, the first row being the header.
fn print_table(table: &[Vec<String>]) -> anyhow::Result<()> {
    let columns = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|i| table.iter().map(|r| r.get(i).map_or(0, |c| c.len())).max().unwrap_or(0)).collect();
    let mut out = std::io::stdout().lock();
    for row in table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
