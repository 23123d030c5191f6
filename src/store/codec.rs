//! The record encoding: postcard behind a one-byte record version (see
//! `records` for the types).

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Version byte in front of every encoded record.
pub const RECORD_VERSION: u8 = 1;

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![RECORD_VERSION];
    let body =
        postcard::to_allocvec(value).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| StoreError::Corrupt(format!("decode: {e}")))
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "record version {v} is not supported"
        ))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::{TaskRecord, TaskState};

    #[test]
    fn round_trip_and_version_check() {
        let t = TaskRecord {
            id: 7,
            workload: "w".into(),
            tenant: None,
            purpose: "p".into(),
            on_behalf_of: "u".into(),
            prompt_sha256: [1; 32],
            prompt_sealed: None,
            tools: vec!["a".into()],
            created_at: 1,
            expires_at: 2,
            state: TaskState::Open,
            completed_at: None,
            lease_count: 0,
        };
        let bytes = encode(&t).unwrap();
        assert_eq!(bytes[0], RECORD_VERSION);
        assert_eq!(decode::<TaskRecord>(&bytes).unwrap(), t);
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert!(decode::<TaskRecord>(&wrong).is_err());
        assert!(decode::<TaskRecord>(&[]).is_err());
        assert!(decode::<TaskRecord>(&bytes[..bytes.len() / 2]).is_err());
    }
}
