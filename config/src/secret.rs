//! Secrets in the configuration (API principals' keys, execution roles, webhook tokens): taken
//! from `${ENV}` or from a file, and never printed. `Debug` and `Display` show `***`, so a
//! configuration logged or compared in a test cannot leak one.

use std::fmt;
use std::path::Path;

use crate::decode::{Decoder, Field, Fields};

/// The largest secret file read: a key or token is a few dozen bytes; anything far larger is a
/// wrong path (a log, a disk image), not a secret.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A secret value from the configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it (a signature check, an environment
    /// handed to a function). Never log what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A secret given either inline as `value_key` (normally `${ENV}`) or as a path in `file_key`
/// whose content (without a trailing newline) is the secret. Both at once, or an empty secret,
/// is an error at the key; a file that cannot be read is an error naming the file and why.
/// `Absent` when neither key is present: the caller decides whether that is an error.
pub(crate) fn secret(
    d: &mut Decoder<'_>,
    fields: &Fields<'_>,
    value_key: &str,
    file_key: &str,
    base_dir: &Path,
) -> Field<Secret> {
    let inline = d.string(fields, value_key);
    let file = d.string(fields, file_key);
    match (inline, file) {
        (Field::Invalid, _) | (_, Field::Invalid) => Field::Invalid,
        (Field::Value(_), Field::Value(_)) => {
            d.error(
                &fields.path_of(file_key),
                format!("give either `{value_key}` or `{file_key}`, not both"),
            );
            Field::Invalid
        }
        (Field::Value(value), Field::Absent) => {
            if value.is_empty() {
                d.error(
                    &fields.path_of(value_key),
                    "the secret is empty (an unset `${VAR}`?)",
                );
                return Field::Invalid;
            }
            Field::Value(Secret(value))
        }
        (Field::Absent, Field::Value(path)) => {
            let at = fields.path_of(file_key);
            let full = base_dir.join(&path);
            match read_secret_file(&full) {
                Ok(value) => Field::Value(Secret(value)),
                Err(message) => {
                    d.error(&at, format!("cannot read `{}`: {message}", full.display()));
                    Field::Invalid
                }
            }
        }
        (Field::Absent, Field::Absent) => {
            // A key written but empty (`token: ${TOKEN}` with TOKEN set to nothing) reads as
            // null: left alone, it would silently turn the protection it configures off.
            for key in [value_key, file_key] {
                if fields.get(key).is_some() {
                    d.error(
                        &fields.path_of(key),
                        "the secret is empty (an unset `${VAR}`?)",
                    );
                    return Field::Invalid;
                }
            }
            Field::Absent
        }
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "larger than {MAX_SECRET_FILE} bytes, which is no key or token"
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err("the file is empty".to_owned());
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_itself() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
