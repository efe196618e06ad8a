//! The fleet's desired state, as the upstream lattice carries it: a document listing apps for a
//! device or a group, with a version that only grows and an expiry, signed with ed25519. The
//! fleet side (`cairnctl fleet publish`) makes it; the device (`cairnd`'s sync) checks it and
//! refuses anything it should not trust, saying why.
//!
//! Where things live in NATS JetStream: documents in the KV bucket `DESIRED_BUCKET` under
//! `device.ID` and `group.NAME`; component bytes in the object store `ARTIFACT_BUCKET` under
//! their digest; device reports in the stream `REPORT_STREAM` on `cairn.report.ID`.

use crate::spec::{AppSpec, SpecError};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

pub const DESIRED_BUCKET: &str = "cairn-desired";
pub const ARTIFACT_BUCKET: &str = "cairn-artifacts";
pub const REPORT_STREAM: &str = "CAIRN_REPORTS";
pub const REPORT_SUBJECTS: &str = "cairn.report.>";
/// The largest signed document a device reads.
pub const MAX_DOCUMENT: usize = 1 << 20;
/// Where the root's delegation of signing keys lives in `DESIRED_BUCKET`.
pub const DELEGATION_KEY: &str = "trust.delegation";

/// The report stream: every device's reports, with a 24-hour window in which a re-sent
/// report (same `Nats-Msg-Id`) is dropped as a duplicate.
pub fn report_stream_config(replicas: usize) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: REPORT_STREAM.to_string(),
        subjects: vec![REPORT_SUBJECTS.to_string()],
        duplicate_window: std::time::Duration::from_secs(24 * 3600),
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The desired-state bucket. Direct gets let a device's credentials allow reading only its
/// own keys (`$JS.API.DIRECT.GET.KV_cairn-desired.$KV.cairn-desired.device.ID`).
pub fn desired_bucket_config(replicas: usize) -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: DESIRED_BUCKET.to_string(),
        history: 5,
        max_value_size: MAX_DOCUMENT as i32,
        num_replicas: replicas,
        ..Default::default()
    }
}

pub fn artifact_store_config(replicas: usize) -> async_nats::jetstream::object_store::Config {
    async_nats::jetstream::object_store::Config {
        bucket: ARTIFACT_BUCKET.to_string(),
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The servers of an upstream: one URL, or several separated by commas (the servers of a
/// cluster; the client tries them in turn).
pub fn server_addrs(text: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let addrs = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("`{url}` is not a NATS server address: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err("no NATS server given".into());
    }
    Ok(addrs)
}

/// Why the lattice turned a connection away, when the fix is a setting of whoever connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// The server refused the credentials given (or the lack of any).
    Credentials,
    /// TLS failed: most often a server certificate signed by a CA that is not trusted.
    Tls,
}

/// Sorts a failed connection for its error message; `None` for anything else (no answer, a
/// wrong address). The device's sync and `cairnctl fleet` each say which of their settings to
/// fix.
pub fn connect_refusal(error: &async_nats::ConnectError) -> Option<ConnectRefusal> {
    use async_nats::ConnectErrorKind;
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            Some(ConnectRefusal::Credentials)
        }
        ConnectErrorKind::Tls => Some(ConnectRefusal::Tls),
        // A certificate rustls rejects comes back as an I/O error.
        _ if error.to_string().contains("certificate") => Some(ConnectRefusal::Tls),
        _ => None,
    }
}

pub fn device_key(device: &str) -> String {
    format!("device.{device}")
}

pub fn group_key(group: &str) -> String {
    format!("group.{group}")
}

/// Where a device publishes one kind of report (`status`, `event`, `log`):
/// `cairn.report.ID.KIND`. A device's NATS user may publish on `cairn.report.ID.>` only.
pub fn report_subject(device: &str, kind: &str) -> String {
    format!("cairn.report.{device}.{kind}")
}

/// Every device's status reports; the last one per subject is each device's latest status.
pub const STATUS_SUBJECTS: &str = "cairn.report.*.status";

/// The device id of a report subject (`cairn.report.ID.KIND`).
pub fn report_device(subject: &str) -> Option<&str> {
    subject.strip_prefix("cairn.report.")?.split('.').next()
}

/// Checks a device id or group name: it becomes one token of a NATS subject and a KV key, so
/// 1 to 64 of `A-Z a-z 0-9 _ -`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid {what}: use 1 to 64 letters, digits, `_` or `-` (it becomes part of a NATS subject)"
        ))
    }
}

/// What a device should run, for one target (`device.ID` or `group.NAME`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    pub version: u64,
    pub target: String,
    pub issued_unix: i64,
    pub expires_unix: i64,
    pub apps: Vec<AppSpec>,
}

/// A root key's word on which keys may sign documents, until when. The root key is kept
/// offline; devices trust it (`upstream.trusted_roots`). Rotating or revoking a signing key is
/// a new delegation with a higher serial; a device never goes back to a lower one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delegation {
    pub serial: u64,
    pub issued_unix: i64,
    pub expires_unix: i64,
    /// Signing keys (hex public keys) whose documents devices accept.
    pub keys: Vec<String>,
}

/// A document and its signature as stored in the KV bucket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    /// The document's JSON, exactly the bytes that were signed.
    pub payload: String,
    /// The signer's public key, hex.
    pub key: String,
    /// The ed25519 signature of `payload`, hex.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("the document is {size} bytes, over the {MAX_DOCUMENT}-byte bound")]
    TooLarge { size: usize },
    #[error("the document is malformed: {0}")]
    Malformed(String),
    #[error("the document is signed by key {key}, which this device does not trust (not in upstream.trusted_keys, nor delegated by a root in upstream.trusted_roots)")]
    UntrustedKey { key: String },
    #[error("the delegation is signed by key {key}, which is not one of this device's roots (upstream.trusted_roots)")]
    UntrustedRoot { key: String },
    #[error("delegation serial {serial} is not newer than the serial {current} this device holds: a replay of an older delegation (one that may name a revoked key), refused")]
    StaleDelegation { serial: u64, current: u64 },
    #[error(
        "the signature does not match the document: it was altered or signed with another key"
    )]
    BadSignature,
    #[error("the document is for `{target}`, not this device or its groups")]
    WrongTarget { target: String },
    #[error("mix-and-match: the document was signed for `{target}` but stored under `{key}`; a document is only valid under the key it was signed for")]
    MixAndMatch { key: String, target: String },
    #[error("version {version} is not newer than the applied version {applied}: a replay or rollback, refused")]
    Stale { version: u64, applied: u64 },
    #[error(
        "the document expired at unix time {expires_unix} (now {now_unix}): refusing stale state"
    )]
    Expired { expires_unix: i64, now_unix: i64 },
    #[error("the document's apps are invalid: {0}")]
    BadApp(String),
}

/// Signs `document` with `key`, giving the bytes to store.
pub fn sign(document: &Document, key: &SigningKey) -> Vec<u8> {
    sign_payload(
        serde_json::to_string(document).expect("a document serialises"),
        key,
    )
}

/// Signs `delegation` with the root `key`, giving the bytes to store.
pub fn sign_delegation(delegation: &Delegation, root: &SigningKey) -> Vec<u8> {
    sign_payload(
        serde_json::to_string(delegation).expect("a delegation serialises"),
        root,
    )
}

fn sign_payload(payload: String, key: &SigningKey) -> Vec<u8> {
    let signature = key.sign(payload.as_bytes());
    let signed = Signed {
        key: hex::encode(key.verifying_key().as_bytes()),
        signature: hex::encode(signature.to_bytes()),
        payload,
    };
    serde_json::to_vec(&signed).expect("a signed document serialises")
}

/// Checks a stored document read from `key`: size, form, a trusted key, the signature, the
/// target (one of this device's, and the very key it was read from), the version against what
/// was applied for that key, and the expiry.
pub fn verify(
    bytes: &[u8],
    trusted: &[VerifyingKey],
    key: &str,
    targets: &[String],
    applied: u64,
    now_unix: i64,
) -> Result<Document, Rejection> {
    let (signer, payload) = open_signed(bytes)?;
    if !trusted.contains(&signer) {
        return Err(Rejection::UntrustedKey {
            key: hex::encode(signer.as_bytes()),
        });
    }
    let document: Document =
        serde_json::from_str(&payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
    if !targets.contains(&document.target) {
        return Err(Rejection::WrongTarget {
            target: document.target,
        });
    }
    if document.target != key {
        return Err(Rejection::MixAndMatch {
            key: key.to_string(),
            target: document.target,
        });
    }
    if document.version <= applied {
        return Err(Rejection::Stale {
            version: document.version,
            applied,
        });
    }
    if document.expires_unix <= now_unix {
        return Err(Rejection::Expired {
            expires_unix: document.expires_unix,
            now_unix,
        });
    }
    check_apps(&document.apps).map_err(Rejection::BadApp)?;
    Ok(document)
}

/// Size, form and signature of a stored signed value: its signer and payload, not yet trusted.
fn open_signed(bytes: &[u8]) -> Result<(VerifyingKey, String), Rejection> {
    if bytes.len() > MAX_DOCUMENT {
        return Err(Rejection::TooLarge { size: bytes.len() });
    }
    let signed: Signed =
        serde_json::from_slice(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let signer = parse_public_key(&signed.key).map_err(Rejection::Malformed)?;
    let signature: [u8; 64] = hex::decode(&signed.signature)
        .ok()
        .and_then(|raw| raw.try_into().ok())
        .ok_or_else(|| Rejection::Malformed("the signature is not 64 hex-encoded bytes".into()))?;
    signer
        .verify(
            signed.payload.as_bytes(),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| Rejection::BadSignature)?;
    Ok((signer, signed.payload))
}

/// Checks a stored delegation: signed by one of `roots`, a serial not below `current` (the
/// same serial is the one held, seen again), not expired, every key well formed. Returns it
/// with its keys parsed.
pub fn verify_delegation(
    bytes: &[u8],
    roots: &[VerifyingKey],
    current: u64,
    now_unix: i64,
) -> Result<(Delegation, Vec<VerifyingKey>), Rejection> {
    let (signer, payload) = open_signed(bytes)?;
    if !roots.contains(&signer) {
        return Err(Rejection::UntrustedRoot {
            key: hex::encode(signer.as_bytes()),
        });
    }
    let delegation: Delegation =
        serde_json::from_str(&payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
    if delegation.serial < current || delegation.serial == 0 {
        return Err(Rejection::StaleDelegation {
            serial: delegation.serial,
            current,
        });
    }
    if delegation.expires_unix <= now_unix {
        return Err(Rejection::Expired {
            expires_unix: delegation.expires_unix,
            now_unix,
        });
    }
    let keys = delegation
        .keys
        .iter()
        .map(|key| parse_public_key(key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Rejection::Malformed)?;
    Ok((delegation, keys))
}

fn check_apps(apps: &[AppSpec]) -> Result<(), String> {
    let mut names = BTreeSet::new();
    for app in apps {
        app.validate()
            .map_err(|e: SpecError| format!("app `{}`: {e}", app.name))?;
        if !app.secrets.is_empty() {
            // Signed is not sealed: whoever may read the bucket, and every device of the
            // target, would read them.
            return Err(format!(
                "app `{}` has [secrets]: fleet documents are signed, not encrypted, so they carry no secrets; use [config] for what anyone may read, and name the secrets in `device_secrets = [..]` with their values on each device in /etc/cairn/secrets/APP.toml",
                app.name
            ));
        }
        if !names.insert(app.name.clone()) {
            return Err(format!("app `{}` is listed twice", app.name));
        }
    }
    Ok(())
}

/// The apps of a fleet state file: `[[app]]` tables, each an app manifest whose `component`
/// is a digest.
pub fn parse_state(text: &str) -> Result<Vec<AppSpec>, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct StateFile {
        #[serde(default, rename = "app")]
        apps: Vec<AppSpec>,
    }
    let state: StateFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
    check_apps(&state.apps)?;
    Ok(state.apps)
}

pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let raw: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|raw| raw.try_into().ok())
        .ok_or_else(|| {
            format!(
                "`{}` is not a public key: expected 64 hex digits",
                text.trim()
            )
        })?;
    VerifyingKey::from_bytes(&raw)
        .map_err(|e| format!("`{}` is not a valid ed25519 public key: {e}", text.trim()))
}

/// Fills `buffer` from the kernel's random source.
pub fn random_bytes(buffer: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buffer)
}

/// Random bytes where a failure must not stop anything (jitter, names that only need to
/// differ): the clock's nanoseconds if the kernel's source cannot be read. Never for keys.
pub fn loose_random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    if random_bytes(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes();
        for (byte, nano) in bytes.iter_mut().zip(nanos.iter().cycle()) {
            *byte = *nano;
        }
    }
    bytes
}

/// A new signing key from the kernel's random source.
pub fn generate_key() -> std::io::Result<SigningKey> {
    let mut seed = [0u8; 32];
    random_bytes(&mut seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Key files hold the 32-byte seed in hex.
pub fn read_key(path: &Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the key {}: {e}", path.display()))?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|raw| raw.try_into().ok())
        .ok_or_else(|| {
            format!(
                "{} is not a cairn fleet key (64 hex digits)",
                path.display()
            )
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn key_file_text(key: &SigningKey) -> String {
    format!("{}\n", hex::encode(key.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn document(version: u64, expires_unix: i64) -> Document {
        Document {
            version,
            target: device_key("edge-1"),
            issued_unix: 100,
            expires_unix,
            apps: parse_state(&format!("[[app]]\nname = \"web\"\ncomponent = \"{DIGEST}\"\n[app.http]\nlisten = \"127.0.0.1:8080\"\n")).unwrap(),
        }
    }

    #[test]
    fn a_signed_document_verifies_and_every_tampering_is_named() {
        let key = generate_key().unwrap();
        let trusted = [key.verifying_key()];
        let targets = [device_key("edge-1"), group_key("north")];
        let signed = sign(&document(3, 1000), &key);
        assert_eq!(
            verify(&signed, &trusted, "device.edge-1", &targets, 2, 500).unwrap(),
            document(3, 1000)
        );

        assert_eq!(
            verify(&signed, &trusted, "device.edge-1", &targets, 3, 500),
            Err(Rejection::Stale {
                version: 3,
                applied: 3
            })
        );
        assert!(matches!(
            verify(&signed, &trusted, "device.edge-1", &targets, 0, 1000),
            Err(Rejection::Expired { .. })
        ));
        assert!(matches!(
            verify(
                &signed,
                &trusted,
                "device.edge-1",
                &[group_key("south")],
                0,
                500
            ),
            Err(Rejection::WrongTarget { .. })
        ));
        // A valid document copied under another of the device's keys is refused.
        assert_eq!(
            verify(&signed, &trusted, "group.north", &targets, 0, 500),
            Err(Rejection::MixAndMatch {
                key: "group.north".into(),
                target: "device.edge-1".into()
            })
        );
        let stranger = generate_key().unwrap();
        assert!(matches!(
            verify(
                &signed,
                &[stranger.verifying_key()],
                "device.edge-1",
                &targets,
                0,
                500
            ),
            Err(Rejection::UntrustedKey { .. })
        ));

        let mut tampered: Signed = serde_json::from_slice(&signed).unwrap();
        tampered.payload = tampered.payload.replace("\"version\":3", "\"version\":30");
        let tampered = serde_json::to_vec(&tampered).unwrap();
        assert_eq!(
            verify(&tampered, &trusted, "device.edge-1", &targets, 0, 500),
            Err(Rejection::BadSignature)
        );

        assert!(matches!(
            verify(b"{}", &trusted, "device.edge-1", &targets, 0, 500),
            Err(Rejection::Malformed(_))
        ));
        let huge = vec![b' '; MAX_DOCUMENT + 1];
        assert!(matches!(
            verify(&huge, &trusted, "device.edge-1", &targets, 0, 500),
            Err(Rejection::TooLarge { .. })
        ));
    }

    #[test]
    fn a_delegation_names_the_signing_keys_and_never_goes_back() {
        let root = generate_key().unwrap();
        let roots = [root.verifying_key()];
        let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
        let delegation = |serial: u64, keys: &[&SigningKey], expires_unix: i64| Delegation {
            serial,
            issued_unix: 100,
            expires_unix,
            keys: keys
                .iter()
                .map(|k| hex::encode(k.verifying_key().as_bytes()))
                .collect(),
        };
        let first = sign_delegation(&delegation(1, &[&a], 1000), &root);
        let (held, keys) = verify_delegation(&first, &roots, 0, 500).unwrap();
        assert_eq!((held.serial, keys), (1, vec![a.verifying_key()]));
        // The same one again is fine (a reconnect); a newer one rotates.
        assert!(verify_delegation(&first, &roots, 1, 500).is_ok());
        let second = sign_delegation(&delegation(2, &[&b], 1000), &root);
        let (_, keys) = verify_delegation(&second, &roots, 1, 500).unwrap();
        assert_eq!(keys, vec![b.verifying_key()]);
        // Going back to serial 1 (which named the revoked key) is refused.
        assert_eq!(
            verify_delegation(&first, &roots, 2, 500),
            Err(Rejection::StaleDelegation {
                serial: 1,
                current: 2
            })
        );
        // Only a root may delegate; an expired delegation is refused.
        let by_a = sign_delegation(&delegation(3, &[&a], 1000), &a);
        assert!(matches!(
            verify_delegation(&by_a, &roots, 2, 500),
            Err(Rejection::UntrustedRoot { .. })
        ));
        assert!(matches!(
            verify_delegation(&second, &roots, 2, 1000),
            Err(Rejection::Expired { .. })
        ));
        // A document is not a delegation.
        let document = sign(&document(1, 1000), &root);
        assert!(matches!(
            verify_delegation(&document, &roots, 0, 500),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn names_that_would_break_a_subject_are_refused() {
        for good in ["edge-1", "pump_7", "cairn-0123456789abcdef"] {
            assert!(check_name("device id", good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(check_name("device id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_files_are_checked() {
        let err = parse_state("[[app]]\nname = \"web\"\ncomponent = \"web.wasm\"\n[app.http]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.contains("not a component digest"), "{err}");
        let twice = format!(
            "[[app]]\nname = \"a\"\ncomponent = \"{DIGEST}\"\n[app.http]\nlisten = \"127.0.0.1:1\"\n[[app]]\nname = \"a\"\ncomponent = \"{DIGEST}\"\n[app.http]\nlisten = \"127.0.0.1:2\"\n"
        );
        assert!(parse_state(&twice).unwrap_err().contains("listed twice"));
        let secret = format!("[[app]]\nname = \"web\"\ncomponent = \"{DIGEST}\"\n[app.http]\nlisten = \"127.0.0.1:8080\"\n[app.config]\nurl = \"x\"\n[app.secrets]\ntoken = \"s3cret\"\n");
        let refused = parse_state(&secret).unwrap_err();
        assert!(refused.contains("carry no secrets"), "{refused}");
        assert!(!refused.contains("s3cret"), "{refused}");
        let typed = format!("[[app]]\nname = \"web\"\ncomponent = \"{DIGEST}\"\n[app.http]\nlisten = \"127.0.0.1:8080\"\n[app.secrets]\ntok = 13579\n");
        let refused = parse_state(&typed).unwrap_err();
        assert!(!refused.contains("13579"), "{refused}");
        assert!(parse_state("[[ap]]\n")
            .unwrap_err()
            .contains("unknown field"));
    }

    #[test]
    fn keys_round_trip_through_their_files() {
        let key = generate_key().unwrap();
        let dir = std::env::temp_dir().join(format!("cairn-key-{}", std::process::id()));
        std::fs::write(&dir, key_file_text(&key)).unwrap();
        assert_eq!(read_key(&dir).unwrap().to_bytes(), key.to_bytes());
        std::fs::remove_file(&dir).unwrap();
        let public = hex::encode(key.verifying_key().as_bytes());
        assert_eq!(parse_public_key(&public).unwrap(), key.verifying_key());
        assert!(parse_public_key("zz").is_err());
    }
}
