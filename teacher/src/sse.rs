//! Incremental server-sent-events decoder.
//!
//! Fed the body chunk by chunk; each byte is scanned once and copied at most
//! twice (partial line, event data), so cost is linear in the body whatever the
//! chunking, and buffers are reused across events.

/// Decodes `data:` events; comments (`: keep-alive`), other fields and blank
/// keep-alive lines are skipped as the SSE spec says.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    /// Bytes of a line split across chunks.
    line: Vec<u8>,
    /// Data of the event being assembled (data lines joined by `\n`).
    data: Vec<u8>,
    has_data: bool,
}

impl SseDecoder {
    /// Feeds one body chunk, calling `on_event` with the data of each completed event.
    pub(crate) fn feed<E>(
        &mut self,
        mut chunk: &[u8],
        on_event: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(pos) = memchr::memchr(b'\n', chunk) {
            let (head, rest) = (&chunk[..pos], &chunk[pos + 1..]);
            if self.line.is_empty() {
                self.on_line(head, on_event)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                let r = self.on_line(&line, on_event);
                line.clear();
                self.line = line;
                r?;
            }
            chunk = rest;
        }
        self.line.extend_from_slice(chunk);
        Ok(())
    }

    /// Flushes a final event the server did not terminate with a blank line.
    pub(crate) fn finish<E>(
        &mut self,
        on_event: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, on_event)?;
        }
        self.dispatch(on_event)
    }

    fn on_line<E>(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        Ok(())
    }

    fn dispatch<E>(&mut self, on_event: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        if !self.has_data {
            return Ok(());
        }
        self.has_data = false;
        let r = on_event(&self.data);
        self.data.clear();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Vec<String> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        let mut f = |e: &[u8]| -> Result<(), ()> {
            out.push(String::from_utf8(e.to_vec()).unwrap());
            Ok(())
        };
        for c in chunks {
            d.feed(c, &mut f).unwrap();
        }
        d.finish(&mut f).unwrap();
        out
    }

    #[test]
    fn events_comments_and_keepalives() {
        let body = b": keep-alive\n\n\ndata: {\"a\":1}\n\nevent: x\nid: 3\ndata: [DONE]\n\n";
        assert_eq!(decode(&[body]), vec!["{\"a\":1}", "[DONE]"]);
    }

    #[test]
    fn any_split_point_gives_same_events() {
        let body: &[u8] =
            b"data: {\"a\":\"x\"}\r\n\r\n: ping\r\n\r\ndata:one\ndata: two\n\ndata: [DONE]\n\n";
        let whole = decode(&[body]);
        assert_eq!(whole, vec!["{\"a\":\"x\"}", "one\ntwo", "[DONE]"]);
        for i in 0..body.len() {
            for j in i..body.len() {
                assert_eq!(
                    decode(&[&body[..i], &body[i..j], &body[j..]]),
                    whole,
                    "split {i} {j}"
                );
            }
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode(&bytes), whole);
    }

    #[test]
    fn unterminated_final_event_is_flushed() {
        assert_eq!(decode(&[b"data: {}\n\ndata: [DONE]"]), vec!["{}", "[DONE]"]);
    }

    #[test]
    fn handler_error_stops_decoding() {
        let mut d = SseDecoder::default();
        let r = d.feed(b"data: 1\n\ndata: 2\n\n", &mut |e: &[u8]| {
            if e == b"1" { Err("boom") } else { Ok(()) }
        });
        assert_eq!(r, Err("boom"));
    }
}
