//! Configuration errors, each with the file, path and position it belongs to.

use std::fmt;

use crate::Location;

/// One problem in a configuration file.
///
/// Displays as `{origin}:{line}:{column}: {path}: {message}`; the position is left out when it
/// is unknown, and the path when the problem is not about one node (a YAML syntax error).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file, or `<string>`-like name given to [`crate::parse_str`].
    pub origin: String,
    /// Dotted path of the node (`functions.resize.timeout`, `functions.f.command[0]`); empty
    /// when the error is about the file as a whole.
    pub path: String,
    pub location: Option<Location>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(location) = self.location {
            write!(f, ":{}:{}", location.line, location.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration file, in file order.
#[derive(Debug, thiserror::Error)]
#[error("{}", lines(.errors))]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

fn lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors {
            errors: vec![error],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(path: &str, location: Option<Location>) -> ConfigError {
        ConfigError {
            origin: "sluice.yaml".to_owned(),
            path: path.to_owned(),
            location,
            message: "bad".to_owned(),
        }
    }

    #[test]
    fn display_leaves_out_what_is_unknown() {
        let at = Some(Location { line: 3, column: 7 });
        assert_eq!(error("a.b", at).to_string(), "sluice.yaml:3:7: a.b: bad");
        assert_eq!(error("a.b", None).to_string(), "sluice.yaml: a.b: bad");
        assert_eq!(error("", at).to_string(), "sluice.yaml:3:7: bad");
        assert_eq!(error("", None).to_string(), "sluice.yaml: bad");
    }

    #[test]
    fn errors_display_one_per_line() {
        let errors = ConfigErrors {
            errors: vec![error("a", None), error("b", None)],
        };
        assert_eq!(
            errors.to_string(),
            "sluice.yaml: a: bad\nsluice.yaml: b: bad"
        );
    }
}
