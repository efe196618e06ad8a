//! Exit codes of cairnctl, one per kind of failure a script may want to tell apart. The daemon
//! maps its errors to gRPC codes (see cairnd's `control` module); this maps those to exits.

use tonic::Code;

pub const OK: i32 = 0;
/// Anything not listed below.
pub const FAILURE: i32 = 1;
/// The command line or the input (manifest, file) is wrong.
pub const INVALID: i32 = 2;
/// The app, component or generation does not exist.
pub const NOT_FOUND: i32 = 3;
/// The caller may not do this.
pub const PERMISSION: i32 = 4;
/// The request conflicts with the device's state (address taken, owned by the fleet, …).
pub const CONFLICT: i32 = 5;
/// The daemon could not be reached.
pub const UNREACHABLE: i32 = 6;
/// The device is out of a resource (disk full, size bound exceeded).
pub const EXHAUSTED: i32 = 7;
/// `status`: an app is failed or in a crashloop (what a health check acts on).
pub const UNHEALTHY: i32 = 8;

/// A failure with the exit code it deserves.
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        Failure {
            code: from_code(status.code()),
            message: status.message().to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure {
            code: INVALID,
            message: format!("{error:#}"),
        }
    }
}

pub fn from_code(code: Code) -> i32 {
    match code {
        Code::Ok => OK,
        Code::InvalidArgument | Code::OutOfRange => INVALID,
        Code::NotFound => NOT_FOUND,
        Code::PermissionDenied | Code::Unauthenticated => PERMISSION,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => CONFLICT,
        Code::Unavailable => UNREACHABLE,
        Code::ResourceExhausted => EXHAUSTED,
        _ => FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_exits() {
        let table = [
            (Code::Ok, OK),
            (Code::InvalidArgument, INVALID),
            (Code::NotFound, NOT_FOUND),
            (Code::PermissionDenied, PERMISSION),
            (Code::FailedPrecondition, CONFLICT),
            (Code::AlreadyExists, CONFLICT),
            (Code::Unavailable, UNREACHABLE),
            (Code::ResourceExhausted, EXHAUSTED),
            (Code::Internal, FAILURE),
            (Code::DataLoss, FAILURE),
        ];
        for (code, exit) in table {
            assert_eq!(from_code(code), exit, "{code:?}");
        }
    }
}
