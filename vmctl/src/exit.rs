//! vmctl's exit statuses, in one place so that every command (and scripts)
//! get the same code for the same outcome. The daemon's answers carry a
//! machine-readable [`ErrorKind`]; [`Exit::of_kind`] is the one mapping from
//! it to a code, so a new command that goes through `call` gets the right
//! code without code of its own.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | failed (an action failed, bad configuration file, I/O, anything else) |
//! | 2 | usage: bad arguments (clap), or a confirmation needed (`--yes`) |
//! | 3 | refused: vmhad would not do it in the module's present state; nothing done |
//! | 4 | not running: vmhad cannot be reached on its control socket (or is shutting down) |
//! | 5 | unknown module (or several configured and none named) |
//! | 6 | the two copies differ (`verify`) |

use std::process::ExitCode;

use vmha_controller::control::ErrorKind;

/// An exit status of vmctl (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    Refused = 3,
    NotRunning = 4,
    UnknownModule = 5,
    Differs = 6,
}

impl Exit {
    /// The code for an answer of this kind.
    pub fn of_kind(kind: ErrorKind) -> Exit {
        match kind {
            ErrorKind::Refused => Exit::Refused,
            ErrorKind::UnknownModule => Exit::UnknownModule,
            ErrorKind::Differs => Exit::Differs,
            ErrorKind::ShuttingDown => Exit::NotRunning,
            ErrorKind::BadRequest | ErrorKind::Failed | ErrorKind::Other => Exit::Failed,
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_stable() {
        let all = [
            Exit::Ok,
            Exit::Failed,
            Exit::Usage,
            Exit::Refused,
            Exit::NotRunning,
            Exit::UnknownModule,
            Exit::Differs,
        ];
        let codes: Vec<u8> = all.iter().map(|e| e.code()).collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(Exit::of_kind(ErrorKind::Refused), Exit::Refused);
        assert_eq!(Exit::of_kind(ErrorKind::UnknownModule), Exit::UnknownModule);
        assert_eq!(Exit::of_kind(ErrorKind::ShuttingDown), Exit::NotRunning);
    }
}
