//! `gearbox token`: a new token for the access list, or the hash of one.

use std::io::BufRead;

use anyhow::{bail, Context};
use gearbox_server::security::acl::token_hash;

/// What a token starts with, so that one found in a file or a log can be recognised.
const PREFIX: &str = "gbx_";
/// Random bytes in a token: 256 bits.
const RANDOM_BYTES: usize = 32;

#[derive(clap::Args)]
pub struct TokenArgs {
    /// Print the hash of this token (with no value, or `-`: read it from standard input)
    /// instead of making a new one
    #[arg(long, value_name = "TOKEN", num_args = 0..=1, default_missing_value = "-")]
    hash: Option<String>,
}

/// Prints a new token and the line for the access list (the token on the first line, the
/// line on the second), or with `--hash`, the `sha256:…` form of a token.
pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    match args.hash.as_deref() {
        Some("-") => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("reading the token from standard input")?;
            let token = line.trim_end_matches(['\r', '\n']);
            if token.is_empty() {
                bail!("no token on standard input");
            }
            println!("sha256:{}", token_hash(token.as_bytes()));
        }
        Some(token) => println!("sha256:{}", token_hash(token.as_bytes())),
        None => {
            let token = new_token()?;
            println!("{token}");
            println!("tokens = [\"sha256:{}\"]", token_hash(token.as_bytes()));
            eprintln!(
                "# the first line is the token: give it to the client (GEARBOX_TOKEN, or --token);\n\
                 # the second goes in the identity's entry of the access list (only the hash is kept)"
            );
        }
    }
    Ok(())
}

/// `gbx_` and 32 bytes from the operating system's random source, in hex.
fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; RANDOM_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random bytes from the system: {e}"))?;
    Ok(bytes.iter().fold(String::from(PREFIX), |mut s, b| {
        s.push_str(&format!("{b:02x}"));
        s
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_hex_and_differ() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        let hex = a.strip_prefix(PREFIX).unwrap();
        assert_eq!(hex.len(), 2 * RANDOM_BYTES);
        assert!(hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{a}");
    }
}
