//! Entry points for the fuzz targets (`fuzz/`, `just fuzz`), one per parser of input cairnd
//! does not control: each takes arbitrary bytes where cairnd would, and must return (an error
//! is fine) without panicking, hanging or growing without bound. Inputs that once failed live under
//! `fuzz/regressions/TARGET/` and are replayed by this module's tests on every `cargo test`.

use crate::pool::protocol::{self, FromPool, ToPool};
use std::sync::OnceLock;

/// An app manifest (`cairnctl deploy -f`, the import folder, a fleet document's apps). What is
/// accepted is stored and read back, so it must round-trip.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = cairn_core::spec::AppSpec::from_manifest(text) {
        let back = cairn_core::spec::AppSpec::from_stored_json(&spec.to_stored_json())
            .expect("an accepted spec reads back once stored");
        assert_eq!(back, spec, "an accepted spec changes once stored");
    }
}

/// A fleet document as the device reads it from the lattice. The first byte chooses between
/// the bytes as they are (form, key, signature) and the rest signed by a trusted key, so that
/// what follows the signature check (the document, its apps) is reached too.
pub fn fleet_document(data: &[u8]) {
    use ed25519_dalek::{Signer, SigningKey};
    let key = SigningKey::from_bytes(&[7; 32]);
    let trusted = [key.verifying_key()];
    let targets = ["device.edge-1".to_string(), "group.pumps".to_string()];
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let Ok(payload) = std::str::from_utf8(rest) else {
            return;
        };
        let signed = cairn_core::fleet::Signed {
            payload: payload.to_string(),
            key: hex::encode(key.verifying_key().as_bytes()),
            signature: hex::encode(key.sign(payload.as_bytes()).to_bytes()),
        };
        serde_json::to_vec(&signed).expect("a signed document serialises")
    };
    // Read from the device key or the group key, by the mode's second bit.
    let read_from = &targets[usize::from(mode & 2 != 0)];
    let _ = cairn_core::fleet::verify(&bytes, &trusted, read_from, &targets, 3, 1_800_000_000);
}

/// A config file (`cairnd.toml`, or the import folder's `config.toml` laid over it).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        let _ = crate::config::Config::from_table(table);
    }
}

/// A manifest in the import folder, read as at boot: the folder holds it as `apps/app.toml`
/// and one small file, `app.wasm`, that it may name.
pub fn import_manifest(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let apps = dir.path().join("apps");
    std::fs::create_dir(&apps).expect("the apps folder");
    std::fs::write(apps.join("app.wasm"), b"\0asm\x0d\0\x01\0").expect("a component");
    let manifest = apps.join("app.toml");
    std::fs::write(&manifest, data).expect("the manifest");
    let limit = crate::admission::Limit {
        bytes: 1 << 20,
        setting: "max_component_size",
    };
    runtime().block_on(async {
        let _ = crate::import::read_manifest(dir.path(), &manifest, "apps/app.toml", limit).await;
    });
}

/// What a pool sends its supervisor, and what the supervisor sends a pool: frames as read
/// from the socket, one after another, until the bytes end or a frame is refused.
pub fn pool_frames(data: &[u8]) {
    runtime().block_on(async {
        let mut reader = data;
        while let Ok(Some(_)) = protocol::receive::<_, FromPool>(&mut reader).await {}
        let mut reader = data;
        while let Ok(Some(_)) = protocol::receive::<_, ToPool>(&mut reader).await {}
    });
}

/// A control request as the socket delivers it: each request message decoded from the bytes,
/// and what the service checks first (an app's name, a deploy's manifest).
pub fn control_request(data: &[u8]) {
    use cairn_core::proto;
    use prost::Message as _;
    if let Ok(deploy) = proto::DeployRequest::decode(data) {
        let _ = cairn_core::spec::AppSpec::from_manifest(&deploy.manifest);
    }
    if let Ok(rollback) = proto::RollbackRequest::decode(data) {
        let _ = rollback.app.parse::<cairn_core::spec::AppName>();
    }
    if let Ok(chunk) = proto::PushChunk::decode(data) {
        if let Some(proto::push_chunk::Part::Meta(meta)) = chunk.part {
            let _ = meta.digest.parse::<cairn_core::digest::Digest>();
        }
    }
    let _ = proto::LogsRequest::decode(data);
    let _ = proto::StatusRequest::decode(data);
    let _ = proto::RemoveRequest::decode(data);
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input kept under `fuzz/regressions/TARGET/` (and the seed corpus under
    /// `fuzz/corpus/TARGET/`) goes through its target again.
    #[test]
    fn kept_fuzz_inputs_pass_through_their_targets() {
        let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 6] = [
            ("manifest", manifest),
            ("fleet_document", fleet_document),
            ("config", config),
            ("import_manifest", import_manifest),
            ("pool_frames", pool_frames),
            ("control_request", control_request),
        ];
        let mut inputs = 0;
        for (name, target) in targets {
            for kind in ["regressions", "corpus"] {
                let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(name)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    target(&std::fs::read(&path).unwrap());
                    inputs += 1;
                }
            }
        }
        assert!(inputs > 0, "no kept inputs under {}", fuzz.display());
    }
}
