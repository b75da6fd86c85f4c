//! `console`: the decisions about keyboard input, apart from the I/O
//! (`streams` does that). With a terminal on stdin, `^]` (0x1d) detaches;
//! without one (a pipe or a file, for scripts), input passes through byte
//! for byte, and the end of it does not detach unless `--detach-on-eof`
//! says so, so that `echo cmd | kubectl vm console x` still shows the reply.

/// The escape character: `^]`, as telnet and virsh.
pub const ESCAPE: u8 = 0x1d;

/// One chunk of input, scanned for the escape character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned<'a> {
    /// What goes to the guest: the bytes before the escape, or all of them.
    pub send: &'a [u8],
    /// Whether the escape was typed: detach after sending `send`.
    pub detach: bool,
}

/// Scans a chunk of keyboard input for the escape character. Bytes before
/// it still reach the guest; bytes after it are dropped (the user asked to
/// leave).
pub fn scan(chunk: &[u8]) -> Scanned<'_> {
    match chunk.iter().position(|&b| b == ESCAPE) {
        Some(i) => Scanned {
            send: &chunk[..i],
            detach: true,
        },
        None => Scanned {
            send: chunk,
            detach: false,
        },
    }
}

/// How input is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputMode {
    /// stdin is a terminal (raw mode, escape character).
    pub tty: bool,
    /// `--detach-on-eof`.
    pub detach_on_eof: bool,
}

/// What the end of stdin means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEof {
    /// Close the console and exit.
    Detach,
    /// Stop reading stdin; go on showing output until the server closes
    /// the console (or a signal ends the command).
    KeepReceiving,
}

impl InputMode {
    /// The escape character is honoured at a terminal only: piped input
    /// may be any bytes.
    pub fn scan(self, chunk: &[u8]) -> Scanned<'_> {
        if self.tty {
            scan(chunk)
        } else {
            Scanned {
                send: chunk,
                detach: false,
            }
        }
    }

    /// A terminal ends only when it hangs up (in raw mode `^D` is a byte
    /// for the guest): detach. A pipe or file ends when the script's input
    /// is sent: keep showing the guest's reply unless asked not to.
    pub fn on_eof(self) -> OnEof {
        if self.tty || self.detach_on_eof {
            OnEof::Detach
        } else {
            OnEof::KeepReceiving
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_escape_anywhere_in_a_chunk() {
        for (chunk, send, detach) in [
            (&b""[..], &b""[..], false),
            (b"ls -l\r", b"ls -l\r", false),
            (b"\x1d", b"", true),
            (b"ls\x1d", b"ls", true),
            (b"\x1dls", b"", true),
            (b"ab\x1dcd\x1def", b"ab", true),
            // ^] is 0x1d only: ESC, ^C, ^D and NUL go to the guest.
            (b"\x1b[A\x03\x04\x00", b"\x1b[A\x03\x04\x00", false),
            (b"\xff\x1d", b"\xff", true),
        ] {
            assert_eq!(scan(chunk), Scanned { send, detach }, "{chunk:?}");
        }
    }

    #[test]
    fn without_a_terminal_input_is_not_scanned() {
        let tty = InputMode {
            tty: true,
            detach_on_eof: false,
        };
        let pipe = InputMode {
            tty: false,
            detach_on_eof: false,
        };
        assert_eq!(
            tty.scan(b"a\x1db"),
            Scanned {
                send: b"a",
                detach: true
            }
        );
        assert_eq!(
            pipe.scan(b"a\x1db"),
            Scanned {
                send: b"a\x1db",
                detach: false
            }
        );
    }

    #[test]
    fn what_the_end_of_input_means() {
        for (tty, detach_on_eof, expected) in [
            (true, false, OnEof::Detach),
            (true, true, OnEof::Detach),
            (false, false, OnEof::KeepReceiving),
            (false, true, OnEof::Detach),
        ] {
            let mode = InputMode { tty, detach_on_eof };
            assert_eq!(mode.on_eof(), expected, "{mode:?}");
        }
    }
}
