//! A configured secret (a token, a password, a URL with credentials): read
//! and written as the plain string it is in the file or the environment,
//! never printed by `{:?}`, so that logging a configuration leaks nothing.

use serde::{Deserialize, Serialize};

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that uses it (a comparison, a client).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Its length in bytes (checked against a minimum).
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(none)" } else { "Secret(***)" })
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_never_printed_but_reads_and_writes_as_its_string() {
        let token = Secret::new("hunter2hunter2hunter2");
        assert_eq!(format!("{token:?}"), "Secret(***)");
        assert_eq!(toml::Value::try_from(&token).unwrap(), toml::Value::String("hunter2hunter2hunter2".into()));
        let read: Secret = toml::Value::String("x".into()).try_into().unwrap();
        assert_eq!(read.expose(), "x");
    }
}
