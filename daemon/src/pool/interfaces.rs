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
    });
}

use bindings::fermyon::spin::variables;
use bindings::wasi::config0_2_0_draft::store as config_draft;
use bindings::wasi::config0_2_0_rc_1::store as config_rc1;
use bindings::wasi::logging::logging;

/// What these interfaces add to every app's linker; what a guest may read is decided per
/// request, by its `Host`.
pub fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    config_draft::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    config_rc1::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    variables::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    logging::add_to_linker::<Host, HasSelf<Host>>(linker, |host| host)?;
    Ok(())
}

/// The interfaces `add_to_linker` provides, for the message of a component that imports one
/// it does not.
pub const PROVIDED: &str = "wasi:config/store@0.2.0-draft and @0.2.0-rc.1, fermyon:spin/variables@2.0.0, wasi:logging/logging@0.1.0-draft";

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
