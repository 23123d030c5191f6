//! Responses never carry an injected credential back: every form of it is
//! replaced in headers and, streaming, in the body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use zeroize::Zeroizing;

pub const REDACTED: &[u8] = b"[redacted by leasehold]";

/// Replaces needles in a stream of chunks; a needle split across chunks is
/// found too (the last `longest - 1` bytes wait for the next chunk).
#[derive(Default)]
pub struct Redactor {
    needles: Arc<Vec<Zeroizing<Vec<u8>>>>,
    longest: usize,
    carry: Zeroizing<Vec<u8>>,
    /// How many replacements were made.
    pub hits: u64,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("needles", &self.needles.len())
            .field("hits", &self.hits)
            .finish()
    }
}

impl Redactor {
    pub fn new(needles: Arc<Vec<Zeroizing<Vec<u8>>>>) -> Self {
        let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
        Self {
            needles,
            longest,
            carry: Zeroizing::new(Vec::new()),
            hits: 0,
        }
    }

    /// Scan `buf` from the start; stop where fewer than `longest` bytes
    /// remain unless `last`. Returns the output and where scanning stopped.
    fn scan(&mut self, buf: &[u8], last: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        let stop = if last {
            buf.len()
        } else {
            buf.len().saturating_sub(self.longest.saturating_sub(1))
        };
        'outer: while i < stop {
            let b = buf[i];
            for n in self.needles.iter() {
                if n[0] == b && buf[i..].starts_with(n) {
                    out.extend_from_slice(REDACTED);
                    self.hits += 1;
                    i += n.len();
                    continue 'outer;
                }
            }
            out.push(b);
            i += 1;
        }
        (out, i.min(buf.len()))
    }

    /// The next chunk, redacted (may hold back its last few bytes).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.longest == 0 {
            return Bytes::copy_from_slice(chunk);
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let (out, used) = self.scan(&buf, false);
        self.carry = Zeroizing::new(buf[used..].to_vec());
        Bytes::from(out)
    }

    /// What was held back, redacted.
    pub fn finish(&mut self) -> Bytes {
        let buf = std::mem::take(&mut self.carry);
        let (out, _) = self.scan(&buf, true);
        Bytes::from(out)
    }

    /// A whole value (a header), redacted.
    pub fn whole(&mut self, v: &[u8]) -> Vec<u8> {
        self.scan(v, true).0
    }
}

/// An upstream's response body, redacted as it streams.
pub struct RedactBody<B> {
    inner: B,
    redactor: Redactor,
    done: bool,
    on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl<B> RedactBody<B> {
    pub fn new(inner: B, redactor: Redactor, on_end: Box<dyn FnOnce(u64) + Send + Sync>) -> Self {
        Self {
            inner,
            redactor,
            done: false,
            on_end: Some(on_end),
        }
    }

    fn end(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.redactor.hits);
        }
    }
}

impl<B> Body for RedactBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    // trailers are dropped: nothing to redact them against
                    if let Ok(data) = frame.into_data() {
                        let out = this.redactor.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.end();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let tail = this.redactor.finish();
                    this.end();
                    if tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(tail))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(needles: &[&str]) -> Redactor {
        Redactor::new(Arc::new(
            needles
                .iter()
                .map(|n| Zeroizing::new(n.as_bytes().to_vec()))
                .collect(),
        ))
    }

    #[test]
    fn a_secret_split_across_every_boundary_is_found() {
        let text = b"head SECRET-123456 mid SECRET-123456tail".to_vec();
        for split in 0..=text.len() {
            for split2 in split..=text.len() {
                let mut x = r(&["SECRET-123456"]);
                let mut out = Vec::new();
                out.extend_from_slice(&x.push(&text[..split]));
                out.extend_from_slice(&x.push(&text[split..split2]));
                out.extend_from_slice(&x.push(&text[split2..]));
                out.extend_from_slice(&x.finish());
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    "head [redacted by leasehold] mid [redacted by leasehold]tail",
                    "split at {split},{split2}"
                );
                assert_eq!(x.hits, 2);
            }
        }
    }

    #[test]
    fn longer_forms_first_and_nothing_else_touched() {
        let mut x = r(&["abcdefgh-long", "abcdefgh"]);
        assert_eq!(
            x.whole(b"abcdefgh-long abcdefgh abcdefg"),
            b"[redacted by leasehold] [redacted by leasehold] abcdefg".to_vec()
        );
        let mut none = r(&[]);
        assert_eq!(&none.push(b"as is")[..], b"as is");
    }
}
