//! The terminal in raw mode for `console`, restored whatever happens: when
//! the guard is dropped (a normal end, an error, an unwinding panic) and
//! from a panic hook (release builds abort on panic, so no destructor runs
//! then). A signal that ends the command (SIGINT, SIGTERM, SIGHUP) is
//! caught by `streams` and ends it normally, through the guard.

use std::sync::{Mutex, Once};

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// Why the terminal cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    /// `tcgetattr`/`tcsetattr` failed.
    #[error("cannot put the terminal in raw mode: {0}")]
    Raw(nix::Error),
}

/// The settings to restore, for the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);
static HOOK: Once = Once::new();

fn restore_saved() {
    // A poisoned lock still holds the settings: restore them all the same.
    let saved = SAVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(t) = saved {
        // Nothing to do about a failure here: we are leaving anyway.
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &t);
    }
}

/// stdin in raw mode while this lives: every byte (`^C`, `^D`, `^Z`
/// included) goes to the guest, nothing is echoed locally.
#[derive(Debug)]
pub struct RawMode(());

impl RawMode {
    /// Puts the terminal on stdin in raw mode.
    pub fn enter() -> Result<Self, TerminalError> {
        let stdin = std::io::stdin();
        let original = tcgetattr(&stdin).map_err(TerminalError::Raw)?;
        *SAVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(original.clone());
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_saved();
                previous(info);
            }));
        });
        let mut raw = original;
        cfmakeraw(&mut raw);
        if let Err(e) = tcsetattr(&stdin, SetArg::TCSANOW, &raw) {
            restore_saved();
            return Err(TerminalError::Raw(e));
        }
        Ok(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_saved();
    }
}
