//! Every internal error mapped to the gRPC status a client can act on, one function per error
//! type, each with a table test; cairnctl maps the statuses to exit codes.

use crate::admission::AdmitError;
use crate::reconcile::ReconcileError;
use crate::store::StoreError;
use tonic::Status;

/// Maps every internal error to the status a client can act on. One place, tested below.
pub fn status_of(error: &ReconcileError) -> Status {
    let message = bounded(error.to_string());
    match error {
        ReconcileError::Spec(_)
        | ReconcileError::Component { .. }
        | ReconcileError::Load { .. } => Status::invalid_argument(message),
        ReconcileError::UnknownApp(_)
        | ReconcileError::UnknownComponent(_)
        | ReconcileError::UnknownGeneration { .. } => Status::not_found(message),
        ReconcileError::NoPreviousGeneration(_)
        | ReconcileError::Unreadable { .. }
        | ReconcileError::AddressTaken { .. }
        | ReconcileError::AddressUnavailable { .. }
        | ReconcileError::OwnedElsewhere { .. }
        | ReconcileError::Pool(_)
        | ReconcileError::Run(_)
        | ReconcileError::Unhealthy { .. }
        | ReconcileError::Limits(_) => Status::failed_precondition(message),
        ReconcileError::Store(error) => store_status(error),
        ReconcileError::Internal(_) => Status::internal(message),
    }
}

pub fn kv_status(error: &crate::pool::services::KvError) -> Status {
    use crate::pool::services::KvError;
    let message = bounded(error.to_string());
    match error {
        KvError::Quota { .. } => Status::resource_exhausted(message),
        KvError::Refused(_) => Status::invalid_argument(message),
        KvError::AccessDenied => Status::failed_precondition(message),
        KvError::Other(_) => Status::internal(message),
    }
}

pub fn store_status(error: &StoreError) -> Status {
    let message = bounded(error.to_string());
    match error {
        StoreError::Full { .. } | StoreError::NoRoom { .. } | StoreError::OverBudget { .. } => {
            Status::resource_exhausted(message)
        }
        StoreError::Gone(_) => Status::not_found(message),
        StoreError::Corrupt { .. } => Status::data_loss(message),
        StoreError::Open { .. } | StoreError::Sqlite(_) => Status::internal(message),
    }
}

/// Why a component was not admitted, as a status.
pub fn admission_status(error: &AdmitError) -> Status {
    let message = bounded(error.to_string());
    match error {
        AdmitError::TooLarge { .. } => Status::resource_exhausted(message),
        AdmitError::File(_) | AdmitError::Mismatch { .. } | AdmitError::Invalid(_) => {
            Status::invalid_argument(message)
        }
        AdmitError::Store(error) => store_status(error),
        AdmitError::Internal(_) => Status::internal(message),
    }
}

/// The most of an error message a status carries. It travels in an HTTP/2 header, which the
/// client refuses past its header-list bound (16 KiB): a longer message, such as one naming
/// a key as long as the manifest, would reach the user as `h2 protocol error` instead.
const MAX_MESSAGE: usize = 4 << 10;

/// `message`, cut at `MAX_MESSAGE` bytes (on a character boundary) and marked.
fn bounded(mut message: String) -> String {
    cairn_core::text::cut(&mut message, MAX_MESSAGE, "… [message cut]");
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::spec::SpecError;
    use std::net::SocketAddr;
    use tonic::Code;

    #[test]
    fn a_long_message_is_cut_to_fit_a_header() {
        let long = ReconcileError::Spec(SpecError::Invalid("é".repeat(10_000)));
        let status = status_of(&long);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().len() <= MAX_MESSAGE + 32);
        assert!(status.message().ends_with("[message cut]"));
        let short = status_of(&ReconcileError::Spec(SpecError::Invalid("x".into())));
        assert!(!short.message().contains("cut"));
    }

    #[test]
    fn every_error_maps_to_a_status_a_client_can_act_on() {
        let digest = Digest::of(b"x");
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let table: Vec<(ReconcileError, Code)> = vec![
            (
                ReconcileError::Spec(SpecError::Invalid("x".into())),
                Code::InvalidArgument,
            ),
            (
                ReconcileError::Component {
                    digest: digest.clone(),
                    source: crate::engine::RuntimeError::CoreModule,
                },
                Code::InvalidArgument,
            ),
            (ReconcileError::UnknownApp("a".into()), Code::NotFound),
            (ReconcileError::UnknownComponent(digest), Code::NotFound),
            (
                ReconcileError::UnknownGeneration {
                    app: "a".into(),
                    generation: 9,
                    available: "1".into(),
                },
                Code::NotFound,
            ),
            (
                ReconcileError::NoPreviousGeneration("a".into()),
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::AddressTaken {
                    addr,
                    app: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::AddressUnavailable {
                    addr,
                    reason: "in use".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::OwnedElsewhere {
                    app: "a".into(),
                    owner: "fleet",
                },
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::Store(StoreError::Full { path: "/x".into() }),
                Code::ResourceExhausted,
            ),
            (
                ReconcileError::Store(StoreError::Corrupt {
                    what: "x".into(),
                    detail: "y".into(),
                }),
                Code::DataLoss,
            ),
            (
                ReconcileError::Store(StoreError::Sqlite("x".into())),
                Code::Internal,
            ),
            (ReconcileError::Internal("x".into()), Code::Internal),
            (
                ReconcileError::Load {
                    digest: Digest::of(b"y"),
                    message: "link".into(),
                },
                Code::InvalidArgument,
            ),
            (
                ReconcileError::Pool("died".into()),
                Code::FailedPrecondition,
            ),
            (
                ReconcileError::Unhealthy {
                    path: "/health".into(),
                    answer: "answered 500".into(),
                },
                Code::FailedPrecondition,
            ),
        ];
        for (error, code) in table {
            let status = status_of(&error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string());
        }
    }

    #[test]
    fn every_refused_component_maps_to_a_status_a_client_can_act_on() {
        let table: Vec<(AdmitError, Code)> = vec![
            (
                AdmitError::TooLarge {
                    limit: 1,
                    setting: "max_component_size",
                },
                Code::ResourceExhausted,
            ),
            (
                AdmitError::Mismatch {
                    actual: Digest::of(b"a"),
                    expected: Digest::of(b"b"),
                },
                Code::InvalidArgument,
            ),
            (
                AdmitError::Invalid(crate::engine::RuntimeError::NotWasm),
                Code::InvalidArgument,
            ),
            (
                AdmitError::File(crate::regular_file::FileError::NotRegular {
                    path: "/dev/zero".into(),
                    kind: "a character device",
                }),
                Code::InvalidArgument,
            ),
            (
                AdmitError::Store(StoreError::Full { path: "/x".into() }),
                Code::ResourceExhausted,
            ),
            (AdmitError::Internal("x".into()), Code::Internal),
        ];
        for (error, code) in table {
            let status = admission_status(&error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string());
        }
    }
}
