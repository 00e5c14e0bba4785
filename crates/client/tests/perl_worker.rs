//! A worker written in Perl serving typed jobs that Rust code submits, through gearbox.

use std::time::Duration;

use gearbox_client::typed::TypedJob;
use gearbox_client::Client;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn rust_client_perl_worker() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(gearbox_server::serve(vec![listener], Default::default(), stop.clone()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/perl_worker.pl");
    let _perl = Child(
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
