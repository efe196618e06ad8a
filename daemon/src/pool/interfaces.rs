//! The host interfaces beyond WASI and `wasi:http` that a guest may import, bound from the WIT
//! in `wit/host` (exact upstream names and versions, so components built for wasmCloud or
//! Spin link unchanged): runtime configuration as `wasi:config/store` (the `0.2.0-draft`
//! that wasmCloud's crates import and the `0.2.0-rc.1` that wasmtime's own crate serves) and
//! Spin's `variables`, all reading the app's `[config]` and `[secrets]`; and
//! `wasi:logging`, whose lines go to the app's log with their level.

use super::host::Host;
use wasmtime::component::{HasSelf, Linker};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/host",
        world: "cairn:host/host",
        // Key-value calls wait on the supervisor (`services`); the rest answer from memory.
        imports: {
            "wasi:keyvalue": async,
            "fermyon:spin/key-value": async,
        },
        with: {
            "wasi:keyvalue/store.bucket": crate::pool::host::KvStore,
            "fermyon:spin/key-value.store": crate::pool::host::KvStore,
        },
    });
}

use super::host::KvStore;
use super::services::{self, Answer, Client, KvError, Op};
use bindings::fermyon::spin::key_value as spin_kv;
use bindings::fermyon::spin::variables;
use bindings::wasi::config0_2_0_draft::store as config_draft;
use bindings::wasi::config0_2_0_rc_1::store as config_rc1;
use bindings::wasi::keyvalue::{atomics, batch, store as kv};
use bindings::wasi::logging::logging;
use std::sync::Arc;
use wasmtime::component::Resource;

/// What these interfaces add to every app's linker; what a guest may read is decided per
/// request, by its `Host`.
pub fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    config_draft::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    config_rc1::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    variables::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    logging::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    kv::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    atomics::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    batch::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    spin_kv::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    Ok(())
}

/// The interfaces `add_to_linker` provides, for the message of a component that imports one
/// it does not.
pub const PROVIDED: &str = "wasi:config/store@0.2.0-draft and @0.2.0-rc.1, fermyon:spin/variables@2.0.0, wasi:logging/logging@0.1.0-draft, wasi:keyvalue/{store,atomics,batch}@0.2.0-draft, fermyon:spin/key-value@2.0.0";

/// The most bytes of keys Spin's `get-keys` returns at once (it cannot page): a store with more
/// is listed through `wasi:keyvalue`'s `list-keys`, which can.
const SPIN_KEYS_BYTES: usize = 8 << 20;

/// One call to the app's store; refused in the pool when the app has none.
async fn ask(client: Option<Arc<Client>>, op: Op) -> Result<Answer, KvError> {
    match client {
        Some(client) => client.call(op).await,
        None => Err(KvError::AccessDenied),
    }
}

fn unexpected(answer: Answer) -> KvError {
    KvError::Other(format!("cairnd answered out of turn: {answer:?}"))
}

impl From<KvError> for kv::Error {
    fn from(error: KvError) -> kv::Error {
        match error {
            KvError::AccessDenied => kv::Error::AccessDenied,
            other => kv::Error::Other(other.to_string()),
        }
    }
}

impl From<KvError> for spin_kv::Error {
    fn from(error: KvError) -> spin_kv::Error {
        match error {
            KvError::AccessDenied => spin_kv::Error::AccessDenied,
            other => spin_kv::Error::Other(other.to_string()),
        }
    }
}

impl Host {
    /// Opens the app's store for this instance, within `MAX_OPEN_STORES`.
    fn open_store(&mut self) -> Result<Resource<KvStore>, KvError> {
        if self.kv.client.is_none() {
            return Err(KvError::AccessDenied);
        }
        if self.kv.open >= services::MAX_OPEN_STORES {
            return Err(KvError::Refused(format!(
                "this instance holds {} stores open already, the most it may",
                services::MAX_OPEN_STORES
            )));
        }
        let store = self
            .table
            .push(KvStore)
            .map_err(|error| KvError::Other(error.to_string()))?;
        self.kv.open += 1;
        Ok(store)
    }

    fn close_store(&mut self, store: Resource<KvStore>) -> wasmtime::Result<()> {
        self.table.delete(store)?;
        self.kv.open = self.kv.open.saturating_sub(1);
        Ok(())
    }

    fn client(&self) -> Option<Arc<Client>> {
        self.kv.client.clone()
    }
}

// Free functions, not methods: a future holding `&Host` across an await would not be `Send`.

async fn get_value(client: Option<Arc<Client>>, key: String) -> Result<Option<Vec<u8>>, KvError> {
    match ask(client, Op::Get { key }).await? {
        Answer::Value(value) => Ok(value),
        other => Err(unexpected(other)),
    }
}

async fn done(client: Option<Arc<Client>>, op: Op) -> Result<(), KvError> {
    match ask(client, op).await? {
        Answer::Done => Ok(()),
        other => Err(unexpected(other)),
    }
}

async fn exists(client: Option<Arc<Client>>, key: String) -> Result<bool, KvError> {
    match ask(client, Op::Exists { key }).await? {
        Answer::Exists(exists) => Ok(exists),
        other => Err(unexpected(other)),
    }
}

async fn keys(
    client: Option<Arc<Client>>,
    cursor: Option<u64>,
) -> Result<(Vec<String>, Option<u64>), KvError> {
    match ask(client, Op::ListKeys { cursor }).await? {
        Answer::Keys { keys, cursor } => Ok((keys, cursor)),
        other => Err(unexpected(other)),
    }
}

impl kv::Host for Host {
    async fn open(&mut self, identifier: String) -> Result<Resource<KvStore>, kv::Error> {
        // The app's one store answers to the empty name and to "default" (Spin's name for it).
        if self.kv.client.is_some() && !matches!(identifier.as_str(), "" | "default") {
            return Err(kv::Error::NoSuchStore);
        }
        Ok(self.open_store()?)
    }
}

impl kv::HostBucket for Host {
    async fn get(
        &mut self,
        _: Resource<KvStore>,
        key: String,
    ) -> Result<Option<Vec<u8>>, kv::Error> {
        Ok(get_value(self.client(), key).await?)
    }

    async fn set(
        &mut self,
        _: Resource<KvStore>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), kv::Error> {
        Ok(done(self.client(), Op::Set { key, value }).await?)
    }

    async fn delete(&mut self, _: Resource<KvStore>, key: String) -> Result<(), kv::Error> {
        Ok(done(self.client(), Op::Delete { key }).await?)
    }

    async fn exists(&mut self, _: Resource<KvStore>, key: String) -> Result<bool, kv::Error> {
        Ok(exists(self.client(), key).await?)
    }

    async fn list_keys(
        &mut self,
        _: Resource<KvStore>,
        cursor: Option<u64>,
    ) -> Result<kv::KeyResponse, kv::Error> {
        let (keys, cursor) = keys(self.client(), cursor).await?;
        Ok(kv::KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, store: Resource<KvStore>) -> wasmtime::Result<()> {
        self.close_store(store)
    }
}

impl atomics::Host for Host {
    async fn increment(
        &mut self,
        _: Resource<KvStore>,
        key: String,
        delta: u64,
    ) -> Result<u64, kv::Error> {
        match ask(self.client(), Op::Increment { key, delta }).await? {
            Answer::Counter(value) => Ok(value),
            other => Err(unexpected(other).into()),
        }
    }
}

impl batch::Host for Host {
    async fn get_many(
        &mut self,
        _: Resource<KvStore>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, kv::Error> {
        match ask(self.client(), Op::GetMany { keys }).await? {
            Answer::Values(values) => Ok(values),
            other => Err(unexpected(other).into()),
        }
    }

    async fn set_many(
        &mut self,
        _: Resource<KvStore>,
        pairs: Vec<(String, Vec<u8>)>,
    ) -> Result<(), kv::Error> {
        Ok(done(self.client(), Op::SetMany { pairs }).await?)
    }

    async fn delete_many(
        &mut self,
        _: Resource<KvStore>,
        keys: Vec<String>,
    ) -> Result<(), kv::Error> {
        Ok(done(self.client(), Op::DeleteMany { keys }).await?)
    }
}

impl spin_kv::Host for Host {}

impl spin_kv::HostStore for Host {
    async fn open(&mut self, label: String) -> Result<Resource<KvStore>, spin_kv::Error> {
        // Spin answers `access-denied` for a label the app was not granted.
        if label != "default" {
            return Err(spin_kv::Error::AccessDenied);
        }
        self.open_store().map_err(|error| match error {
            KvError::Refused(_) => spin_kv::Error::StoreTableFull,
            other => other.into(),
        })
    }

    async fn get(
        &mut self,
        _: Resource<KvStore>,
        key: String,
    ) -> Result<Option<Vec<u8>>, spin_kv::Error> {
        Ok(get_value(self.client(), key).await?)
    }

    async fn set(
        &mut self,
        _: Resource<KvStore>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), spin_kv::Error> {
        Ok(done(self.client(), Op::Set { key, value }).await?)
    }

    async fn delete(&mut self, _: Resource<KvStore>, key: String) -> Result<(), spin_kv::Error> {
        Ok(done(self.client(), Op::Delete { key }).await?)
    }

    async fn exists(&mut self, _: Resource<KvStore>, key: String) -> Result<bool, spin_kv::Error> {
        Ok(exists(self.client(), key).await?)
    }

    async fn get_keys(&mut self, _: Resource<KvStore>) -> Result<Vec<String>, spin_kv::Error> {
        let (mut all, mut cursor) = keys(self.client(), None).await?;
        let mut bytes: usize = all.iter().map(String::len).sum();
        while let Some(next) = cursor {
            let (page, after) = keys(self.client(), Some(next)).await?;
            bytes += page.iter().map(String::len).sum::<usize>();
            if bytes > SPIN_KEYS_BYTES {
                return Err(spin_kv::Error::Other(format!(
                    "the store's keys come to more than {SPIN_KEYS_BYTES} bytes, more than get-keys returns at once: list them with wasi:keyvalue's list-keys, which pages"
                )));
            }
            all.extend(page);
            cursor = after;
        }
        Ok(all)
    }

    async fn drop(&mut self, store: Resource<KvStore>) -> wasmtime::Result<()> {
        self.close_store(store)
    }
}

impl config_draft::Host for Host {
    fn get(&mut self, key: String) -> Result<Option<String>, config_draft::Error> {
        Ok(self.config.get(&key).cloned())
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, config_draft::Error> {
        Ok(self.config.all())
    }
}

impl config_rc1::Host for Host {
    fn get(&mut self, key: String) -> Result<Option<String>, config_rc1::Error> {
        Ok(self.config.get(&key).cloned())
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, config_rc1::Error> {
        Ok(self.config.all())
    }
}

impl variables::Host for Host {
    fn get(&mut self, name: String) -> Result<String, variables::Error> {
        if let Err(why) = spin_variable_name(&name) {
            return Err(variables::Error::InvalidName(format!("{name:?}: {why}")));
        }
        self.config.get(&name).cloned().ok_or_else(|| {
            variables::Error::Undefined(format!(
                "no variable {name:?}: the app's [config] and [secrets] do not name it"
            ))
        })
    }
}

impl logging::Host for Host {
    fn log(&mut self, level: logging::Level, context: String, message: String) {
        let level = match level {
            logging::Level::Trace => "trace",
            logging::Level::Debug => "debug",
            logging::Level::Info => "info",
            logging::Level::Warn => "warn",
            logging::Level::Error => "error",
            logging::Level::Critical => "critical",
        };
        self.logged.push(level, &context, &message);
    }
}

/// Spin's rule for a variable name, so a Spin component meets here the errors it meets there:
/// lower-case letters, digits and single underscores, starting with a letter and ending with
/// a letter or digit.
fn spin_variable_name(name: &str) -> Result<(), &'static str> {
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => Err("a variable name cannot be empty"),
        (Some(first), _) if !first.is_ascii_lowercase() => {
            Err("a variable name must start with a lower-case letter")
        }
        (_, Some(b'_')) => Err("a variable name cannot end with an underscore"),
        _ if name.contains("__") => Err("a variable name cannot hold two underscores in a row"),
        _ if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_') =>
        {
            Err("a variable name holds only lower-case letters, digits and underscores")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::spin_variable_name;

    #[test]
    fn spin_variable_names_follow_spin() {
        for good in ["a", "api_url", "x1", "a_b_c"] {
            assert!(spin_variable_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1a", "_a", "a_", "a__b", "Api", "a-b", "a.b"] {
            assert!(spin_variable_name(bad).is_err(), "{bad}");
        }
    }
}
