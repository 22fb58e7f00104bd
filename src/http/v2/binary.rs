//! The binary tensor data extension of the REST protocol: a JSON header of
//! `Inference-Header-Content-Length` bytes, then each binary tensor's bytes
//! in the order of the inputs (or outputs) whose `binary_data_size`
//! parameter says how many are theirs.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::http::ApiError;
use crate::serve::tensor::Elements;

/// The header giving the JSON part's length in bytes.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The JSON header and the binary rest of a request body; all JSON when
/// the header is absent.
pub fn split<'a>(body: &'a [u8], headers: &HeaderMap) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let bad = || ApiError::BadRequest(format!("header {HEADER_LENGTH}: {value:?} is not a length in bytes"));
    let len: usize = value.to_str().map_err(|_| bad())?.trim().parse().map_err(|_| bad())?;
    if len > body.len() {
        return Err(ApiError::BadRequest(format!(
            "header {HEADER_LENGTH} says the JSON is {len} bytes, the body has {}",
            body.len()
        )));
    }
    Ok(body.split_at(len))
}

/// `parameters.binary_data_size` of an input: how many of the binary
/// bytes are its data (`None`: its data is JSON).
pub fn data_size(name: &str, parameters: Option<&Map<String, Value>>) -> Result<Option<usize>, ApiError> {
    match parameters.and_then(|p| p.get("binary_data_size")) {
        None => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            ApiError::BadRequest(format!("input {name:?}: binary_data_size {v} is not a non-negative integer"))
        }),
    }
}

/// Reads the inputs' binary data from `binary` in order, each its
/// `binary_data_size` bytes; every byte must belong to an input.
pub struct BinaryReader<'a> {
    rest: &'a [u8],
}

impl<'a> BinaryReader<'a> {
    pub fn new(binary: &'a [u8]) -> Self {
        BinaryReader { rest: binary }
    }

    /// The next `size` bytes, decoded as `datatype`.
    pub fn take(&mut self, name: &str, datatype: &str, size: usize) -> Result<Elements, ApiError> {
        if size > self.rest.len() {
            return Err(ApiError::BadRequest(format!(
                "input {name:?}: binary_data_size {size} but only {} binary bytes are left",
                self.rest.len()
            )));
        }
        let (raw, rest) = self.rest.split_at(size);
        self.rest = rest;
        Ok(Elements::from_raw(name, datatype, raw)?)
    }

    /// Fails when bytes are left that no input claimed.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(ApiError::BadRequest(format!("{n} binary bytes after the last input's binary_data_size"))),
        }
    }
}

/// A response of `json` (the header, whose outputs name their
/// `binary_data_size`) followed by `binary`.
pub fn response(json: Vec<u8>, binary: Vec<u8>) -> Response {
    let len = HeaderValue::from(json.len());
    let mut body = json;
    body.extend_from_slice(&binary);
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], [(HEADER_LENGTH, len)], body)
        .into_response()
}
