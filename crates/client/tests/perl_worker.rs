//! A worker written in Perl serving typed jobs that Rust code submits, through gearbox.

mod common;

use std::time::Duration;

use common::{gearbox, Proc};
use gearbox_client::typed::TypedJob;
use gearbox_client::Client;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct WordCount {
    text: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Counted {
    words: u32,
}

impl TypedJob for WordCount {
    const FUNCTION: &'static str = "word_count";
    type Output = Counted;
}

#[tokio::test]
async fn rust_client_perl_worker() {
    let (addr, stop) = gearbox().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/perl_worker.pl");
    let _perl = Proc(
        std::process::Command::new("perl")
            .args([script, &addr])
            .spawn()
            .expect("perl with Gearman::Worker (Debian libgearman-client-perl)"),
    );
    let client = Client::new([addr.as_str()]).with_timeout(Duration::from_secs(20));
    for (text, words) in [("one two three", 3), ("  spaced   out  ", 2), ("", 0)] {
        let counted = client.run_typed(&WordCount { text: text.into() }).await.unwrap();
        assert_eq!(counted, Counted { words });
    }
    stop.cancel();
}
