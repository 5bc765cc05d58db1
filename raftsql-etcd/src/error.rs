//! etcd's errors, with the gRPC codes and messages its clients match on, and how they cross
//! raftsql-core (application errors with a code).

use raftsql_core::Error as CoreError;

use crate::mvcc::MAX_TXN_DEPTH;

/// etcd's errors, with the exact gRPC codes and messages its clients match on.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A request over etcd's 1.5 MiB limit.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// Granting a lease id that exists.
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    /// A TTL over etcd's maximum.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// The requested revision was compacted away.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is not written yet.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    /// ignore_value / ignore_lease on a missing key.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// Empty key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A lease that does not exist.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// Two writes to one key in one txn branch.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// More than [`crate::MAX_TXN_OPS`] operations in a branch, or [`crate::MAX_TXN_TOTAL_OPS`] in all.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// Txns nested more than [`MAX_TXN_DEPTH`] deep.
    #[error("raftsql: txn request nested more than {MAX_TXN_DEPTH} levels deep")]
    TxnTooDeep,
    /// No leader (elections, no quorum).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// Timed out waiting for the cluster.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl From<CoreError> for EtcdError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotLeader { .. } | CoreError::Unavailable(_) => EtcdError::NoLeader,
            CoreError::Timeout(_) | CoreError::OutcomeUnknown => EtcdError::Timeout,
            other => EtcdError::Internal(other.to_string()),
        }
    }
}

impl From<rusqlite::Error> for EtcdError {
    fn from(e: rusqlite::Error) -> Self {
        EtcdError::Internal(e.to_string())
    }
}

impl From<EtcdError> for tonic::Status {
    fn from(e: EtcdError) -> Self {
        use tonic::Code;
        let code = match e {
            EtcdError::Compacted | EtcdError::FutureRev => Code::OutOfRange,
            EtcdError::KeyNotFound
            | EtcdError::EmptyKey
            | EtcdError::DuplicateKey
            | EtcdError::TooManyOps
            | EtcdError::TxnTooDeep => Code::InvalidArgument,
            EtcdError::LeaseNotFound => Code::NotFound,
            EtcdError::LeaseExist => Code::FailedPrecondition,
            EtcdError::RequestTooLarge => Code::InvalidArgument,

            EtcdError::LeaseTtlTooLarge => Code::OutOfRange,
            EtcdError::NoLeader => Code::Unavailable,
            EtcdError::Timeout => Code::Unavailable,
            EtcdError::Internal(_) => Code::Unknown,
        };
        tonic::Status::new(code, e.to_string())
    }
}

impl EtcdError {
    /// The code this error travels under as a core application error
    /// ([`CoreError::Application`]): through [`raftsql_core::Node::write`] and reads, and in a
    /// forwarded call's answer. `None` for errors that map to core's own variants.
    fn app_code(&self) -> Option<u32> {
        Some(match self {
            EtcdError::Compacted => 1,
            EtcdError::FutureRev => 2,
            EtcdError::KeyNotFound => 3,
            EtcdError::EmptyKey => 4,
            EtcdError::LeaseNotFound => 5,
            EtcdError::DuplicateKey => 6,
            EtcdError::TooManyOps => 7,
            EtcdError::LeaseExist => 8,
            EtcdError::LeaseTtlTooLarge => 9,
            EtcdError::RequestTooLarge => 10,
            EtcdError::TxnTooDeep => 11,
            EtcdError::NoLeader | EtcdError::Timeout | EtcdError::Internal(_) => return None,
        })
    }

    /// The error an application code names: the one whose [`EtcdError::app_code`] it is
    /// (one table, so the two directions cannot disagree).
    fn from_app_code(code: u32) -> Option<EtcdError> {
        Self::coded()
            .into_iter()
            .find(|e| e.app_code() == Some(code))
    }

    /// Every error that travels under an application code.
    fn coded() -> [EtcdError; 11] {
        [
            EtcdError::Compacted,
            EtcdError::FutureRev,
            EtcdError::KeyNotFound,
            EtcdError::EmptyKey,
            EtcdError::LeaseNotFound,
            EtcdError::DuplicateKey,
            EtcdError::TooManyOps,
            EtcdError::LeaseExist,
            EtcdError::LeaseTtlTooLarge,
            EtcdError::RequestTooLarge,
            EtcdError::TxnTooDeep,
        ]
    }
}

pub(crate) type R<T> = Result<T, EtcdError>;

/// An etcd error back from core's (see [`EtcdError::app_code`]).
pub(crate) fn decode_err(e: CoreError) -> EtcdError {
    match e {
        CoreError::Application { code, message } => {
            EtcdError::from_app_code(code).unwrap_or(EtcdError::Internal(message))
        }
        // The message as it was (`encode_err` made it from an etcd Internal error).
        CoreError::Internal(m) => EtcdError::Internal(m),
        e => e.into(),
    }
}

/// An etcd error as core's: etcd's own as [`CoreError::Application`] with its code.
pub(crate) fn encode_err(e: EtcdError) -> CoreError {
    match (e.app_code(), e) {
        (Some(code), e) => CoreError::Application {
            code,
            message: e.to_string(),
        },
        (None, EtcdError::Internal(m)) => CoreError::Internal(m),
        (None, EtcdError::NoLeader) => CoreError::Unavailable("no leader".into()),
        (None, _) => CoreError::Timeout(std::time::Duration::ZERO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every etcd error crosses core (a write's closure, a forwarded call, the wire between
    /// nodes) and comes back as itself, with etcd's message.
    #[test]
    fn etcd_errors_survive_the_trip_through_core_and_the_wire() {
        let uncoded = [
            EtcdError::NoLeader,
            EtcdError::Timeout,
            EtcdError::Internal("disk on fire".into()),
        ];
        // Every code from 1 up is taken once, none skipped.
        let codes: Vec<u32> = EtcdError::coded()
            .iter()
            .filter_map(|e| e.app_code())
            .collect();
        assert_eq!(codes, (1..=codes.len() as u32).collect::<Vec<_>>());
        for e in EtcdError::coded().into_iter().chain(uncoded) {
            let want = e.to_string();
            let core = encode_err(e);
            let wire = raftsql_core::fuzzing::error_response(7, &core);
            let Some(raftsql_proto::v1::response::Body::Error(pe)) = wire.body else {
                panic!("not an error response")
            };
            let over_the_wire = decode_err(raftsql_core::fuzzing::from_pb(pe)).to_string();
            let local = decode_err(core).to_string();
            assert_eq!(over_the_wire, want);
            assert_eq!(local, want);
        }
    }
}
