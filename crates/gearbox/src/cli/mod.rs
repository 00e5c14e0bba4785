//! The everyday client commands, for any Gearman server: `gearbox submit`, `work`, `admin`,
//! `log` and `result`. This file holds what they share: where they connect, the admin-line
//! exchange, and table and JSON output.

mod admin;
mod dead;
mod log;
mod submit;
mod work;

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use admin::{admin, AdminArgs};
pub use dead::{dead, DeadArgs};
pub use log::{log, result, LogArgs, ResultArgs};
pub use submit::{submit, SubmitArgs};
pub use work::{work, WorkArgs};

/// Where the client commands connect.
#[derive(clap::Args, Clone)]
pub struct Servers {
    /// Job server HOST:PORT; repeat (or comma-separate) for several
    #[arg(
        long = "server",
        short = 's',
        env = "GEARBOX_SERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:4730"
    )]
    servers: Vec<String>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Sends one admin line and reads the reply (a single line, or a listing ending in ".").
async fn admin_line(server: &str, line: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(server).await.with_context(|| format!("connecting to {server}"))?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await??;
        if n == 0 {
            bail!("{server} closed the connection");
        }
        reply.extend_from_slice(&buf[..n]);
        let single = reply.starts_with(b"OK") || reply.starts_with(b"ERR");
        if (single && reply.ends_with(b"\n")) || reply == b".\n" || reply.ends_with(b"\n.\n") {
            return Ok(String::from_utf8_lossy(&reply).into_owned());
        }
    }
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
