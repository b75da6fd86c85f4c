//! Logging: `tracing` with the plain `fmt` subscriber, level from `--log-level`.

use tracing::Level;

/// Bad `--log-level` values.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// Not one of the five levels.
    #[error("unknown log level {0:?}: use error, warn, info, debug or trace")]
    Level(String),
    /// A global subscriber was already installed.
    #[error("cannot install the log subscriber: {0}")]
    Init(String),
}

/// Parses a level name.
pub fn parse_level(s: &str) -> Result<Level, TelemetryError> {
    s.parse::<Level>()
        .map_err(|_| TelemetryError::Level(s.to_string()))
}

/// Installs the global subscriber: one line per event on stderr.
pub fn init(level: Level) -> Result<(), TelemetryError> {
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init()
        .map_err(|e| TelemetryError::Init(e.to_string()))
}
