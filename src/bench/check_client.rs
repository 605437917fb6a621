//! The `check` scenario's client: Envoy ext_authz `Check` over a bare HTTP/2 connection.
//!
//! The bench measures the sidecar, so its own client should cost as little as Envoy's C++
//! one does. tonic's generic client (tower layers, a `HashMap` header map and a prost
//! message built per call) cost the load generator ~17 µs of CPU per check on the 2-core
//! bench machine, CPU the sidecar and Redis then could not use. This client writes the
//! `CheckRequest` protobuf straight into one buffer and speaks gRPC framing over `h2`.

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;

use super::{BENCH_HOST, BENCH_PATH};

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Field numbers of the envoy.service.auth.v3 messages this client writes.
mod field {
    /// CheckRequest.attributes
    pub const ATTRIBUTES: u32 = 1;
    /// AttributeContext.request
    pub const REQUEST: u32 = 4;
    /// AttributeContext.Request.http
    pub const HTTP: u32 = 2;
    /// AttributeContext.HttpRequest.method, .headers, .path, .host
    pub const METHOD: u32 = 2;
    pub const HEADERS: u32 = 3;
    pub const PATH: u32 = 4;
    pub const HOST: u32 = 5;
    /// map entry key and value
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
}

/// One HTTP/2 connection; clones share it (each call is its own stream).
#[derive(Clone)]
pub struct CheckClient {
    send: h2::client::SendRequest<Bytes>,
    uri: http::Uri,
    addr: String,
}

impl CheckClient {
    pub async fn connect(addr: &str) -> Result<Self, String> {
        let authority = addr.trim_start_matches("http://");
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot reach {authority}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (send, connection) = h2::client::handshake(tcp)
            .await
            .map_err(|e| format!("http/2 handshake with {authority}: {e}"))?;
        tokio::spawn(connection);
        let uri = format!("http://{authority}{CHECK_PATH}")
            .parse()
            .map_err(|e| format!("bad target {authority}: {e}"))?;
        Ok(Self {
            send,
            uri,
            addr: addr.to_owned(),
        })
    }

    /// One check; `Ok` when allowed, else the error's kind for the errors table.
    pub async fn check(&mut self, bearer: &str, request_id: &str) -> Result<(), String> {
        let body = grpc_frame(bearer, request_id);
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|_| "grpc:request".to_owned())?;
        let mut send = match self.send.clone().ready().await {
            Ok(send) => send,
            Err(_) => {
                // The connection is gone (server restarted): this worker opens its own.
                *self = Self::connect(&self.addr)
                    .await
                    .map_err(|_| "grpc:connect".to_owned())?;
                self.send
                    .clone()
                    .ready()
                    .await
                    .map_err(|_| "grpc:connection".to_owned())?
            }
        };
        let (response, mut stream) = send
            .send_request(request, false)
            .map_err(|_| "grpc:stream".to_owned())?;
        stream
            .send_data(body, true)
            .map_err(|_| "grpc:send".to_owned())?;
        let (head, mut body) = response
            .await
            .map_err(|_| "grpc:response".to_owned())?
            .into_parts();
        if head.status != http::StatusCode::OK {
            return Err(format!("grpc:http {}", head.status.as_u16()));
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|_| "grpc:body".to_owned())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            message.extend_from_slice(&chunk);
        }
        // A trailers-only answer carries grpc-status in the headers.
        let trailers = body.trailers().await.map_err(|_| "grpc:trailers")?;
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| head.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if status != "0" {
            return Err(format!("grpc:status {status}"));
        }
        let answer = decode_frame(&message).ok_or("check:bad answer")?;
        match answer.status {
            Some(status) if status.code == 0 => Ok(()),
            Some(status) => Err(format!("denied:{}", status.message)),
            None => Err("check:no status".into()),
        }
    }
}

/// The CheckResponse in a single gRPC frame (5-byte prefix, uncompressed).
fn decode_frame(frame: &[u8]) -> Option<CheckResponse> {
    let (prefix, rest) = frame.split_at_checked(5)?;
    let len = u32::from_be_bytes(prefix[1..5].try_into().ok()?) as usize;
    if prefix[0] != 0 || rest.len() != len {
        return None;
    }
    CheckResponse::decode(rest).ok()
}

fn len_field_size(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_len_prefix(buf: &mut BytesMut, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_str(buf: &mut BytesMut, tag: u32, value: &str) {
    put_len_prefix(buf, tag, value.len());
    buf.put_slice(value.as_bytes());
}

fn header_entry_len(name: &str, value: &str) -> usize {
    len_field_size(field::KEY, name.len()) + len_field_size(field::VALUE, value.len())
}

/// A gRPC frame holding the CheckRequest Envoy would send for `POST bench.local/v1/bench`
/// with these two headers (the same request the tonic client built, byte for byte).
pub fn grpc_frame(bearer: &str, request_id: &str) -> Bytes {
    let headers = [("authorization", bearer), ("x-request-id", request_id)];
    let http_len = len_field_size(field::METHOD, "POST".len())
        + headers
            .iter()
            .map(|(n, v)| len_field_size(field::HEADERS, header_entry_len(n, v)))
            .sum::<usize>()
        + len_field_size(field::PATH, BENCH_PATH.len())
        + len_field_size(field::HOST, BENCH_HOST.len());
    let request_len = len_field_size(field::HTTP, http_len);
    let attributes_len = len_field_size(field::REQUEST, request_len);
    let message_len = len_field_size(field::ATTRIBUTES, attributes_len);

    let mut buf = BytesMut::with_capacity(5 + message_len);
    buf.put_u8(0); // not compressed
    buf.put_u32(message_len as u32);
    put_len_prefix(&mut buf, field::ATTRIBUTES, attributes_len);
    put_len_prefix(&mut buf, field::REQUEST, request_len);
    put_len_prefix(&mut buf, field::HTTP, http_len);
    put_str(&mut buf, field::METHOD, "POST");
    for (name, value) in headers {
        put_len_prefix(&mut buf, field::HEADERS, header_entry_len(name, value));
        put_str(&mut buf, field::KEY, name);
        put_str(&mut buf, field::VALUE, value);
    }
    put_str(&mut buf, field::PATH, BENCH_PATH);
    put_str(&mut buf, field::HOST, BENCH_HOST);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use std::collections::HashMap;

    #[test]
    fn the_hand_written_frame_decodes_to_the_request_envoy_sends() {
        let frame = grpc_frame("Bearer tg_abc", "b1-2-3");
        assert_eq!(frame[0], 0);
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len, frame.len() - 5);
        let decoded = CheckRequest::decode(&frame[5..]).expect("a CheckRequest");
        let expected = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        host: BENCH_HOST.into(),
                        path: BENCH_PATH.into(),
                        headers: HashMap::from([
                            ("authorization".to_owned(), "Bearer tg_abc".to_owned()),
                            ("x-request-id".to_owned(), "b1-2-3".to_owned()),
                        ]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        assert_eq!(decoded, expected);
    }

    #[test]
    fn long_values_get_multi_byte_lengths() {
        let bearer = format!("Bearer {}", "k".repeat(300));
        let frame = grpc_frame(&bearer, "id");
        let decoded = CheckRequest::decode(&frame[5..]).expect("a CheckRequest");
        let headers = decoded
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .map(|h| h.headers)
            .unwrap_or_default();
        assert_eq!(headers.get("authorization"), Some(&bearer));
    }

    #[test]
    fn a_frame_of_the_wrong_length_is_refused() {
        let answer = CheckResponse::default().encode_to_vec();
        let mut frame = vec![0, 0, 0, 0, answer.len() as u8 + 1];
        frame.extend_from_slice(&answer);
        assert!(decode_frame(&frame).is_none());
        frame[4] -= 1;
        assert!(decode_frame(&frame).is_some());
    }
}
