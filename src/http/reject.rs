//! hyper answers a request it cannot parse itself — 400 (malformed request line or
//! header), 414 (URI too long), 431 (too many or too large headers) — with an empty
//! body, before any route sees it. This wrapper around the connection's IO turns
//! exactly those automatic responses into the contract's JSON error, so every refusal
//! a client gets reads the same. Our own responses always carry a body (or are 1xx,
//! 204, 304), so an empty-bodied 400/414/431 head can only be hyper's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An IO stream whose hyper-made error responses are rewritten as JSON.
pub struct JsonRejects<S> {
    inner: S,
    /// a rewritten response still being written out
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> JsonRejects<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            pending: None,
        }
    }

    /// The stream, once the connection is upgraded (hyper wrote its last response,
    /// the 101, which is never rewritten).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The JSON response for one of hyper's automatic error heads, or `None` when `head`
/// is anything else.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let (code, status, message) = if head.starts_with(b"HTTP/1.1 400 ") {
        ("invalid_request", "400 Bad Request", "malformed request")
    } else if head.starts_with(b"HTTP/1.1 414 ") {
        (
            "invalid_request",
            "414 URI Too Long",
            "the request URI is too long",
        )
    } else if head.starts_with(b"HTTP/1.1 431 ") {
        (
            "invalid_request",
            "431 Request Header Fields Too Large",
            "the request headers are too many or too large",
        )
    } else {
        return None;
    };
    let text = std::str::from_utf8(head).ok()?;
    let end = text.find("\r\n\r\n")?;
    // the whole write is one bare head with no body
    if end + 4 != text.len()
        || !text
            .to_ascii_lowercase()
            .contains("\r\ncontent-length: 0\r\n")
    {
        return None;
    }
    let body = format!(r#"{{"error":"{code}","message":"{message}"}}"#);
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncWrite + Unpin> JsonRejects<S> {
    /// Writes what is left of a rewritten response; `Ready(Ok)` once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let count =
                std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if count == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += count;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonRejects<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonRejects<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if let Some(json) = rewrite(buf) {
            self.pending = Some((json, 0));
            std::task::ready!(self.drain(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // one contiguous buffer per write (hyper then flattens its head), so a head is
    // seen whole
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_error_heads_are_rewritten() {
        let bare =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let rewritten = String::from_utf8(rewrite(bare).expect("rewritten")).expect("utf-8");
        assert!(rewritten.starts_with("HTTP/1.1 431 "));
        assert!(rewritten.ends_with(r#"{"error":"invalid_request","message":"the request headers are too many or too large"}"#));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 52\r\n\r\n";
        assert!(rewrite(ours).is_none(), "a head with a body is ours");
        assert!(rewrite(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}").is_none());
    }
}
