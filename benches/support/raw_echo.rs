//! The raw baseline the benches measure beside the dispatcher: a length-prefixed echo that
//! flushes when no more input is buffered (the same write coalescing as the dispatcher's).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

/// Echoes `u32`-prefixed frames from `read` to `write`, with `buffer`-byte buffers, until
/// either side ends.
pub(crate) async fn raw_echo(
    read: impl AsyncRead + Unpin,
    write: impl AsyncWrite + Unpin,
    buffer: usize,
) {
    let mut reader = BufReader::with_capacity(buffer, read);
    let mut writer = BufWriter::with_capacity(buffer, write);
    let mut body = Vec::new();
    loop {
        let Ok(len) = reader.read_u32().await else {
            return;
        };
        body.resize(len as usize, 0);
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let _ = writer.write_u32(len).await;
        let _ = writer.write_all(&body).await;
        if reader.buffer().is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
}
