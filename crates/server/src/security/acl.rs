//! The access list (`--acl FILE`): which identities may submit which functions, work on
//! which, and use the admin protocol. Deny by default: an identity the file does not name may
//! do nothing, and a connection without identity is `anonymous`.
//!
//! ```toml
//! [identity.web]                 # a client certificate whose subject CN is "web"
//! submit = ["resize", "mail.*"]  # function globs (`*`, `?`, `[a-z]`, `{a,b}`)
//! admin = "read"                 # none (default), read or write
//!
//! [identity.resizer]
//! work = ["resize"]
//!
//! [identity.deploy]              # a token identity: OPTION_REQ auth=TOKEN
//! tokens = ["sha256:9f86d08…"]   # `gearbox token` makes one and prints its hash
//! submit = ["*"]
//! admin = "write"
//!
//! [identity.anonymous]           # connections with neither
//! admin = "read"
//! ```
//!
//! This follows OpenStack's Gearman server (gear), which maps certificate CNs to the
//! functions a connection may register and submit.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use gearbox_proto::AdminCommand;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The identity of connections that presented neither a certificate nor a token.
pub const ANONYMOUS: &str = "anonymous";

/// How far an identity may use the admin protocol (and the same actions over HTTP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminRight {
    #[default]
    None,
    /// Commands that read the queue's state: status, workers, show jobs, stats, version …
    Read,
    /// Everything: the job log and the dead set (payloads), cancel, maxqueue, pause, dead
    /// retry, shutdown …
    Write,
}

impl AdminRight {
    pub fn label(self) -> &'static str {
        match self {
            AdminRight::None => "none",
            AdminRight::Read => "read",
            AdminRight::Write => "write",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    submit: Vec<String>,
    #[serde(default)]
    work: Vec<String>,
    #[serde(default)]
    admin: AdminRight,
    #[serde(default)]
    tokens: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    identity: BTreeMap<String, Entry>,
}

/// What one identity may do.
#[derive(Debug)]
pub struct Grant {
    pub name: String,
    submit: GlobSet,
    work: GlobSet,
    pub admin: AdminRight,
}

impl Grant {
    /// The grant of an identity the access list does not name: nothing.
    pub fn nothing(name: &str) -> Grant {
        Grant { name: name.into(), submit: GlobSet::empty(), work: GlobSet::empty(), admin: AdminRight::None }
    }

    pub fn may_submit(&self, function: &[u8]) -> bool {
        self.submit.is_match(std::ffi::OsStr::from_bytes(function))
    }

    pub fn may_work(&self, function: &[u8]) -> bool {
        self.work.is_match(std::ffi::OsStr::from_bytes(function))
    }

    /// GET_STATUS and GET_STATUS_UNIQUE: for identities that may submit something.
    pub fn may_ask_status(&self) -> bool {
        !self.submit.is_empty()
    }

    pub fn may_admin(&self, command: &AdminCommand) -> bool {
        self.admin >= needed(command)
    }
}

/// The right an admin command needs.
pub fn needed(command: &AdminCommand) -> AdminRight {
    use AdminCommand as A;
    match command {
        A::Status
        | A::PriorityStatus
        | A::Workers
        | A::Version
        | A::GetPid
        | A::Verbose
        | A::MaxQueueList
        | A::ShowJobs
        | A::ShowUniqueJobs
        | A::Stats
        | A::Cluster
        | A::LimitList
        | A::RetryList => AdminRight::Read,
        // The job log and the dead set hold payloads and results: reading them is more than
        // reading the queue's counters.
        A::Log { .. }
        | A::MaxQueue { .. }
        | A::CancelJob { .. }
        | A::CreateFunction { .. }
        | A::DropFunction { .. }
        | A::Shutdown { .. }
        | A::Pause { .. }
        | A::Limit { .. }
        | A::Retry { .. }
        | A::Dead { .. } => AdminRight::Write,
    }
}

/// A loaded access list.
#[derive(Debug)]
pub struct Acl {
    grants: HashMap<String, std::sync::Arc<Grant>>,
    /// SHA-256 of each token (hex) → identity.
    tokens: HashMap<String, String>,
}

impl Acl {
    /// Reads and checks `path`; the error names the file and what is wrong in it.
    pub fn load(path: &Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read ACL {}: {e}", path.display()))?;
        Acl::parse(&text).map_err(|e| format!("bad ACL {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Acl, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut grants = HashMap::new();
        let mut tokens = HashMap::new();
        for (name, entry) in file.identity {
            for token in &entry.tokens {
                let hash = token
                    .strip_prefix("sha256:")
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| {
                        format!("identity {name:?}: tokens are stored hashed, as `sha256:` and 64 hex digits (`gearbox token` prints one)")
                    })?;
                if let Some(other) = tokens.insert(hash.to_ascii_lowercase(), name.clone()) {
                    return Err(format!("identities {other:?} and {name:?} have the same token"));
                }
            }
            let grant = Grant {
                submit: globs(&name, "submit", &entry.submit)?,
                work: globs(&name, "work", &entry.work)?,
                admin: entry.admin,
                name: name.clone(),
            };
            grants.insert(name, std::sync::Arc::new(grant));
        }
        Ok(Acl { grants, tokens })
    }

    /// The grant of `identity` (`None`: anonymous); an identity not in the file gets nothing.
    pub fn grant(&self, identity: Option<&str>) -> std::sync::Arc<Grant> {
        let name = identity.unwrap_or(ANONYMOUS);
        self.grants.get(name).cloned().unwrap_or_else(|| std::sync::Arc::new(Grant::nothing(name)))
    }

    /// The identity of the token with this hash ([`token_hash`]).
    pub fn token_identity(&self, hash: &str) -> Option<&str> {
        self.tokens.get(hash).map(String::as_str)
    }
}

/// Lower-case hex SHA-256 of a token, as the ACL file stores it after `sha256:`. Tokens are
/// long random strings (`gearbox token`), so a fast hash suffices: there is nothing to guess
/// by trying words.
pub fn token_hash(token: &[u8]) -> String {
    let digest = Sha256::digest(token);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn globs(name: &str, field: &str, patterns: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        set.add(Glob::new(p).map_err(|e| format!("identity {name:?}, {field}: {e}"))?);
    }
    set.build().map_err(|e| format!("identity {name:?}, {field}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [identity.web]
        submit = ["resize", "mail.*"]
        admin = "read"

        [identity.resizer]
        work = ["resize", "thumb-?"]

        [identity.deploy]
        tokens = ["sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"]
        submit = ["*"]
        admin = "write"
    "#;

    #[test]
    fn globs_grant_and_everything_else_is_denied() {
        let acl = Acl::parse(FILE).unwrap();
        let web = acl.grant(Some("web"));
        assert!(web.may_submit(b"resize") && web.may_submit(b"mail.send"));
        assert!(!web.may_submit(b"resize2") && !web.may_submit(b"payments") && !web.may_work(b"resize"));
        assert!(
            web.may_admin(&AdminCommand::Status) && !web.may_admin(&AdminCommand::CancelJob { handle: "H".into() })
        );
        let resizer = acl.grant(Some("resizer"));
        assert!(resizer.may_work(b"thumb-1") && !resizer.may_work(b"thumb-10") && !resizer.may_submit(b"resize"));
        assert!(!resizer.may_admin(&AdminCommand::Status) && !resizer.may_ask_status());
        let stranger = acl.grant(Some("stranger"));
        assert!(!stranger.may_submit(b"resize") && !stranger.may_admin(&AdminCommand::Version));
        assert!(!acl.grant(None).may_submit(b"x"), "no anonymous entry: anonymous may do nothing");
    }

    #[test]
    fn tokens_are_matched_by_their_hash() {
        let acl = Acl::parse(FILE).unwrap();
        assert_eq!(token_hash(b"secret"), "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b");
        assert_eq!(acl.token_identity(&token_hash(b"secret")), Some("deploy"));
        assert_eq!(acl.token_identity(&token_hash(b"guess")), None);
        let deploy = acl.grant(acl.token_identity(&token_hash(b"secret")));
        assert!(deploy.may_admin(&AdminCommand::Dead { words: vec!["retry".into(), "all".into()] }));
    }

    #[test]
    fn plain_tokens_and_bad_globs_are_refused() {
        let err = Acl::parse("[identity.x]\ntokens = [\"hunter2\"]\n").unwrap_err();
        assert!(err.contains("hashed"), "{err}");
        let err = Acl::parse("[identity.x]\nsubmit = [\"[a\"]\n").unwrap_err();
        assert!(err.contains("submit"), "{err}");
        let err = Acl::parse("[identity.x]\nsubmitt = [\"a\"]\n").unwrap_err();
        assert!(err.contains("submitt"), "{err}");
        let err = Acl::parse("[identity.x]\nadmin = \"all\"\n").unwrap_err();
        assert!(err.contains("admin") || err.contains("all"), "{err}");
    }

    #[test]
    fn payloads_and_changes_need_write() {
        let dead = |w: &str| AdminCommand::Dead { words: w.split(' ').map(|s| s.to_string().into()).collect() };
        for words in ["list", "show H:x:1", "retry all", "delete H:x:1"] {
            assert_eq!(needed(&dead(words)), AdminRight::Write, "{words}");
        }
        assert_eq!(needed(&AdminCommand::Log { query: String::new() }), AdminRight::Write);
        assert_eq!(needed(&AdminCommand::Status), AdminRight::Read);
    }
}
