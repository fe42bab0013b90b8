//! One error type for every AWS call both deployables make, with one classifier per service
//! deciding whether retrying may succeed, and one readable text for any SDK error.
//!
//! Every seam over AWS (the capture's ledger and batch sink and notifier, the compactor's ledger
//! and object store, `cdc-verify`) fails with [`AwsError`], so "transient" and "definite" mean the
//! same thing everywhere and one retry helper ([`crate::retry`]) serves them all.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::http::Response;

/// Why an AWS call failed, as far as a retry is concerned.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AwsError {
    /// Throttling, timeouts, 5xx, lost connections and replies: retrying may succeed.
    #[error("{0}")]
    Transient(String),
    /// A missing table, bucket or queue, access denied, a malformed request or item: a person
    /// must act.
    #[error("{0}")]
    Definite(String),
}

impl AwsError {
    /// True when retrying may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, AwsError::Transient(_))
    }

    /// The same failure with `context` in front of its text.
    pub fn context(self, context: &str) -> Self {
        match self {
            AwsError::Transient(t) => AwsError::Transient(format!("{context}: {t}")),
            AwsError::Definite(t) => AwsError::Definite(format!("{context}: {t}")),
        }
    }

    /// A DynamoDB failure of `what`. Definite: a missing table, a refused or unrecognised
    /// request, denied access, a request that could not be built. Anything else (throttling,
    /// 5xx, conflicts, lost connections) is transient.
    pub fn dynamodb<E: ProvideErrorMetadata, R>(what: &str, err: SdkError<E, R>) -> Self {
        let text = format!("DynamoDB {what}: {}", error_text(&err));
        let definite = match &err {
            SdkError::ServiceError(_) => matches!(
                err.code().unwrap_or(""),
                "ResourceNotFoundException"
                    | "ValidationException"
                    | "AccessDeniedException"
                    | "UnrecognizedClientException"
            ),
            SdkError::ConstructionFailure(_) => true,
            _ => false,
        };
        Self::of(definite, text)
    }

    /// An S3 failure of `what`. Definite: any 4xx but 408 and 429 (a missing bucket, denied
    /// access, a malformed request), or a request that could not be built; the rest is transient.
    pub fn s3<E: ProvideErrorMetadata>(what: &str, err: SdkError<E, Response>) -> Self {
        let status = http_status(&err);
        let text = error_text(&err);
        match (&err, status) {
            (SdkError::ServiceError(_), Some(code)) if client_fault(code) => {
                let hint =
                    if code == 404 && !matches!(err.code(), Some("NoSuchKey" | "NoSuchUpload")) {
                        " (does the bucket exist?)"
                    } else {
                        ""
                    };
                AwsError::Definite(format!("S3 {what}: HTTP {code} {text}{hint}"))
            }
            (SdkError::ConstructionFailure(_), _) => {
                AwsError::Definite(format!("S3 {what}: {text}"))
            }
            _ => AwsError::Transient(format!("S3 {what}: {text}")),
        }
    }

    /// An SQS failure of `what`. Definite: a missing queue, denied access, a refused request, a
    /// request that could not be built; throttling and the rest are transient.
    pub fn sqs<E: ProvideErrorMetadata>(what: &str, err: SdkError<E, Response>) -> Self {
        let text = format!("SQS {what}: {}", error_text(&err));
        let definite = match &err {
            SdkError::ServiceError(_) => {
                let throttled = matches!(
                    err.code().unwrap_or(""),
                    "ThrottlingException" | "RequestThrottled" | "KmsThrottled"
                );
                !throttled && http_status(&err).is_some_and(client_fault)
            }
            SdkError::ConstructionFailure(_) => true,
            _ => false,
        };
        Self::of(definite, text)
    }

    fn of(definite: bool, text: String) -> Self {
        if definite {
            AwsError::Definite(text)
        } else {
            AwsError::Transient(text)
        }
    }
}

impl From<crate::ledger::ItemError> for AwsError {
    /// A ledger item without the contract's layout: no retry reads it differently.
    fn from(e: crate::ledger::ItemError) -> Self {
        AwsError::Definite(e.to_string())
    }
}

/// A 4xx that retrying will not change (408 and 429 will).
fn client_fault(status: u16) -> bool {
    (400..500).contains(&status) && status != 408 && status != 429
}

/// The HTTP status of a service's error reply.
pub fn http_status<E>(err: &SdkError<E, Response>) -> Option<u16> {
    match err {
        SdkError::ServiceError(_) => err.raw_response().map(|r| r.status().as_u16()),
        _ => None,
    }
}

/// A readable one-line text for an SDK error of any service (its code and message, else what
/// kind of failure it was).
pub fn error_text<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> String {
    match (err.code(), err.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_owned(),
        _ => match err {
            SdkError::DispatchFailure(e) => format!("dispatch failure: {e:?}"),
            SdkError::TimeoutError(_) => "timeout".to_owned(),
            SdkError::ResponseError(_) => "unreadable response".to_owned(),
            SdkError::ConstructionFailure(_) => "request construction failed".to_owned(),
            _ => "service error".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::error::ErrorMetadata;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    fn service(status: u16, code: &str) -> SdkError<ErrorMetadata, Response> {
        let meta = ErrorMetadata::builder().code(code).message("m").build();
        let raw = Response::new(
            StatusCode::try_from(status).expect("a valid status"),
            SdkBody::empty(),
        );
        SdkError::service_error(meta, raw)
    }

    fn timeout() -> SdkError<ErrorMetadata, Response> {
        SdkError::timeout_error("slow")
    }

    #[test]
    fn each_service_sorts_its_failures_into_transient_and_definite() {
        let cases = [
            (
                AwsError::dynamodb("get", service(400, "ResourceNotFoundException")),
                false,
            ),
            (
                AwsError::dynamodb("get", service(400, "AccessDeniedException")),
                false,
            ),
            (
                AwsError::dynamodb(
                    "get",
                    service(400, "ProvisionedThroughputExceededException"),
                ),
                true,
            ),
            (
                AwsError::dynamodb("get", service(400, "TransactionConflictException")),
                true,
            ),
            (
                AwsError::dynamodb("get", service(500, "InternalServerError")),
                true,
            ),
            (AwsError::dynamodb("get", timeout()), true),
            (AwsError::s3("put k", service(404, "NoSuchBucket")), false),
            (AwsError::s3("put k", service(403, "AccessDenied")), false),
            (AwsError::s3("put k", service(503, "SlowDown")), true),
            (AwsError::s3("put k", service(429, "TooManyRequests")), true),
            (AwsError::s3("put k", service(408, "RequestTimeout")), true),
            (AwsError::s3("put k", timeout()), true),
            (
                AwsError::sqs(
                    "send",
                    service(400, "AWS.SimpleQueueService.NonExistentQueue"),
                ),
                false,
            ),
            (
                AwsError::sqs("send", service(400, "ThrottlingException")),
                true,
            ),
            (AwsError::sqs("send", service(500, "InternalError")), true),
        ];
        for (error, transient) in cases {
            assert_eq!(error.is_transient(), transient, "{error}");
        }
    }

    #[test]
    fn the_text_names_the_service_the_call_and_the_code() {
        let e = AwsError::s3("bucket b", service(404, ""));
        assert!(e.to_string().starts_with("S3 bucket b: HTTP 404"), "{e}");
        assert!(e.to_string().ends_with("(does the bucket exist?)"), "{e}");
        let e = AwsError::dynamodb("record flush", service(400, "ThrottlingException"));
        assert_eq!(
            e.to_string(),
            "DynamoDB record flush: ThrottlingException: m"
        );
        assert_eq!(
            e.context("slot s").to_string(),
            "slot s: DynamoDB record flush: ThrottlingException: m"
        );
    }
}
