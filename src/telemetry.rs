//! Log setup: lowercase messages with data in fields, filtered by `RUST_LOG`, on
//! stderr (stdout carries only the start-up banner). `HIVESYNC_LOG_FORMAT=json` writes
//! one JSON object per line (timestamp, level, target, fields with the message, the
//! current span and its parents); text is the default, coloured only when stderr is a
//! terminal.

use std::io::IsTerminal;

/// The log formats `HIVESYNC_LOG_FORMAT` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `text` (or unset) and `json`, in any case; anything else is refused.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(LogFormat::Text),
            Some(value) if value.eq_ignore_ascii_case("text") => Ok(LogFormat::Text),
            Some(value) if value.eq_ignore_ascii_case("json") => Ok(LogFormat::Json),
            Some(other) => Err(format!(
                "HIVESYNC_LOG_FORMAT must be text or json, not '{other}'"
            )),
        }
    }
}

/// Installs the subscriber; a bad `HIVESYNC_LOG_FORMAT` is an error for the caller to
/// report (logging is not up yet).
pub fn init() -> Result<(), String> {
    let format = LogFormat::parse(std::env::var("HIVESYNC_LOG_FORMAT").ok().as_deref())?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,gix=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_target(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_text_by_default_json_on_request_and_nothing_else() {
        assert_eq!(LogFormat::parse(None), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("JSON")), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(Some("text")), Ok(LogFormat::Text));
        assert!(LogFormat::parse(Some("xml")).is_err());
    }
}
