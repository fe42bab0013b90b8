//! One readable text for any AWS SDK error, so the capture's and the compactor's logs and error
//! messages name failures the same way.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

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
