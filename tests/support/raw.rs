//! A gRPC client that sends and receives raw message bytes, so tests can
//! send fields our proto does not know and compare bytes exactly.

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// A codec that passes message bytes through untouched.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

/// Encoder half of [`RawCodec`].
pub struct RawEncoder;
/// Decoder half of [`RawCodec`].
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

fn grpc(channel: Channel, limit: usize) -> tonic::client::Grpc<Channel> {
    tonic::client::Grpc::new(channel)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
}

async fn unary_with_limit(
    channel: Channel,
    path: &str,
    req: Request<Bytes>,
    limit: usize,
) -> Result<Response<Bytes>, Status> {
    let mut g = grpc(channel, limit);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    g.unary(
        req,
        PathAndQuery::try_from(path.to_owned()).unwrap(),
        RawCodec,
    )
    .await
}

/// A unary call with raw bytes and no client-side size limit, to send what
/// kubelet never would.
pub async fn unary_unlimited(
    channel: Channel,
    path: &str,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    unary_with_limit(channel, path, req, usize::MAX).await
}

/// A unary call with raw bytes, with kubelet's message limits.
pub async fn unary(
    channel: Channel,
    path: &str,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    unary_with_limit(channel, path, req, super::MAX_MESSAGE).await
}

/// A server-streaming call with raw bytes.
pub async fn server_streaming(
    channel: Channel,
    path: &str,
    req: Request<Bytes>,
) -> Result<Response<Streaming<Bytes>>, Status> {
    let mut g = grpc(channel, super::MAX_MESSAGE);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    g.server_streaming(
        req,
        PathAndQuery::try_from(path.to_owned()).unwrap(),
        RawCodec,
    )
    .await
}

/// An empty `ImageFsInfo`: the call tests use to ask "is it still serving?".
pub async fn image_fs_info(channel: Channel) -> Result<Response<Bytes>, Status> {
    unary(
        channel,
        "/runtime.v1.ImageService/ImageFsInfo",
        Request::new(Bytes::new()),
    )
    .await
}

/// Opens a `StreamImages` stream.
pub async fn stream_images(channel: Channel, req: Request<Bytes>) -> Streaming<Bytes> {
    server_streaming(channel, "/runtime.v1.ImageService/StreamImages", req)
        .await
        .unwrap()
        .into_inner()
}
