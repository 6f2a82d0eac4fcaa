//! One error type for the library. Every variant that comes from reading a file names
//! the file and what was wrong with it, so the CLI can print a single useful line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file exists but its content is not what we expected (bad header, wrong shape,
    /// missing field, unsupported value).
    #[error("{}: {what}", path.display())]
    Format { path: PathBuf, what: String },

    /// The message includes the OS error, so it is not chained as a source as well
    /// (which would print it twice).
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A request that cannot be served (bad argument, unknown option value).
    #[error("{0}")]
    Invalid(String),

    #[error("tensor op: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// candle appends a captured backtrace to its message when RUST_BACKTRACE is set; a
/// user-facing error is one line.
pub fn candle_message(e: &candle_core::Error) -> String {
    let e = match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.as_ref(),
        e => e,
    };
    e.to_string().lines().next().unwrap_or_default().to_string()
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            what: what.into(),
        }
    }

    pub fn io(path: impl AsRef<Path>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            error,
        }
    }

    /// The same error about `path` instead: a file written under a staging name is
    /// reported under the name the user gave.
    pub fn at(self, path: impl AsRef<Path>) -> Self {
        match self {
            Error::Format { what, .. } => Error::format(path, what),
            Error::Io { error, .. } => Error::io(path, error),
            e => e,
        }
    }
}

/// A JSON settings file as `T`; the error names the file and the field at fault
/// (`field `thresholds.unsafe`: invalid type: …`), which serde's own message does not.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| field_error(e, path))?;
    // What `serde_json::from_str` also refuses: anything after the value.
    de.end().map_err(|e| Error::format(path, e.to_string()))?;
    Ok(value)
}

/// [`parse_json`] of a value already parsed (a config rearranged before it is read).
pub(crate) fn from_json_value<T: serde::de::DeserializeOwned>(value: serde_json::Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| field_error(e, path))
}

fn field_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>, path: &Path) -> Error {
    let at = e.path().to_string();
    let msg = e.into_inner().to_string();
    Error::format(path, if at == "." { msg } else { format!("field `{at}`: {msg}") })
}

/// Attaches a file to a lower-level error (candle, safetensors, serde).
pub(crate) trait InFile<T> {
    fn in_file(self, path: &Path) -> Result<T>;
}

impl<T, E: std::fmt::Display> InFile<T> for std::result::Result<T, E> {
    fn in_file(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::format(path, e.to_string().lines().next().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Settings {
        thresholds: Thresholds,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Thresholds {
        unsafe_: f32,
    }

    #[test]
    fn json_errors_name_the_field_and_trailing_text_is_refused() {
        let p = Path::new("so8t_config.json");
        let e = parse_json::<Settings>(r#"{"thresholds": {"unsafe_": "high"}}"#, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("so8t_config.json") && e.contains("field `thresholds.unsafe_`"), "{e}");
        let e = parse_json::<Settings>(r#"{"thresholds": {"unsafe_": 0.5}} {"#, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("trailing characters"), "{e}");
        assert!(parse_json::<Settings>(r#" {"thresholds": {"unsafe_": 0.5}} "#, p).is_ok());
    }
}
