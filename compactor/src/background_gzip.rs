//! A gzip stream compressed on its own thread, so compressing a part's JSONL overlaps with
//! parsing the staged lines and encoding Parquet on the caller's thread.
//!
//! Input is handed over in chunks of [`CHUNK`] bytes through a channel of [`IN_FLIGHT`] chunks
//! (the caller blocks when the thread falls that far behind), so memory stays bounded. The output
//! is the same gzip stream a [`GzEncoder`] fed on the caller's thread would produce.
//!
//! A complete gzip member compressed elsewhere (a staged batch going into a part whole) can be
//! appended as it is ([`BackgroundGzip::append_member`]): the member being compressed ends
//! there and the next input starts a new one. A file of several members is one gzip file
//! (RFC 1952, 2.2); every gzip reader reads on to the end.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use flate2::write::GzEncoder;

/// Bytes gathered before a chunk goes to the thread.
pub const CHUNK: usize = 1024 * 1024;
/// Chunks handed over and not compressed yet, at most.
pub const IN_FLIGHT: usize = 4;

/// What the thread sends back: for `raw` input bytes and `member` bytes of a member appended
/// whole, the bytes it produced.
type Piece = std::io::Result<(u64, u64, Vec<u8>)>;

/// What the thread is handed.
enum Input {
    /// Bytes to compress.
    Raw(Vec<u8>),
    /// A complete gzip member to append as it is.
    Member(Vec<u8>),
}

/// A gzip stream being compressed on a background thread.
pub struct BackgroundGzip {
    pending: Vec<u8>,
    tx: Option<SyncSender<Input>>,
    rx: Receiver<Piece>,
    thread: Option<JoinHandle<()>>,
    /// Compressed bytes received and not taken.
    ready: Vec<u8>,
    /// Compressed bytes taken.
    taken: u64,
    /// Raw bytes handed to the thread.
    raw_sent: u64,
    /// Raw bytes the thread has compressed, and the compressed bytes they gave.
    raw_done: u64,
    compressed_done: u64,
    /// Bytes of whole members handed to the thread, and received back.
    members_sent: u64,
    members_done: u64,
}

fn stopped() -> std::io::Error {
    std::io::Error::other("the gzip thread stopped")
}

/// Moves the front of `bytes` into `pending` until `pending` holds `chunk` bytes or `bytes` is
/// empty: true when `pending` is full and must be handed over before the rest (a write of any
/// size goes out in pieces of at most `chunk`, so what is in flight stays bounded). Shared by
/// the zstd stream.
pub(crate) fn fill_chunk(pending: &mut Vec<u8>, bytes: &mut &[u8], chunk: usize) -> bool {
    let take = chunk.saturating_sub(pending.len()).min(bytes.len());
    pending.extend_from_slice(&bytes[..take]);
    *bytes = &bytes[take..];
    pending.len() >= chunk
}

impl BackgroundGzip {
    /// Starts the thread, compressing at `level`.
    pub fn new(level: u32) -> std::io::Result<Self> {
        let (tx, input) = mpsc::sync_channel::<Input>(IN_FLIGHT);
        let (output, rx) = mpsc::channel::<Piece>();
        let compression = flate2::Compression::new(level);
        let thread = std::thread::Builder::new()
            .name("jsonl-gzip".into())
            .spawn(move || {
                let mut gz: Option<GzEncoder<Vec<u8>>> = None;
                let mut any_member = false;
                for chunk in input {
                    let piece = match chunk {
                        Input::Raw(chunk) => {
                            let e =
                                gz.get_or_insert_with(|| GzEncoder::new(Vec::new(), compression));
                            e.write_all(&chunk)
                                .map(|()| (chunk.len() as u64, 0, std::mem::take(e.get_mut())))
                        }
                        Input::Member(member) => {
                            any_member = true;
                            gz.take()
                                .map_or(Ok(Vec::new()), GzEncoder::finish)
                                .map(|mut out| {
                                    out.extend_from_slice(&member);
                                    (0, member.len() as u64, out)
                                })
                        }
                    };
                    let failed = piece.is_err();
                    if output.send(piece).is_err() || failed {
                        return;
                    }
                }
                // The caller closed the input: the stream's end. A stream of no input at all
                // is still a gzip file (one empty member).
                let tail = match gz.take() {
                    Some(e) => e.finish(),
                    None if !any_member => GzEncoder::new(Vec::new(), compression).finish(),
                    None => Ok(Vec::new()),
                };
                let _ = output.send(tail.map(|tail| (0, 0, tail)));
            })?;
        Ok(BackgroundGzip {
            pending: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            rx,
            thread: Some(thread),
            ready: Vec::new(),
            taken: 0,
            raw_sent: 0,
            raw_done: 0,
            compressed_done: 0,
            members_sent: 0,
            members_done: 0,
        })
    }

    /// Appends `bytes` to the stream.
    pub fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while fill_chunk(&mut self.pending, &mut bytes, CHUNK) {
            self.send_pending()?;
        }
        Ok(())
    }

    fn send_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK));
        self.raw_sent += chunk.len() as u64;
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(Input::Raw(chunk))
            .map_err(|_| stopped())?;
        self.collect()
    }

    /// Appends a complete gzip member as it is, after the bytes written so far.
    pub fn append_member(&mut self, member: &[u8]) -> std::io::Result<()> {
        self.send_pending()?;
        self.members_sent += member.len() as u64;
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(Input::Member(member.to_vec()))
            .map_err(|_| stopped())?;
        self.collect()
    }

    fn receive(&mut self, piece: Piece) -> std::io::Result<()> {
        let (raw, member, bytes) = piece?;
        self.raw_done += raw;
        self.members_done += member;
        self.compressed_done += bytes.len() as u64 - member;
        self.ready.extend_from_slice(&bytes);
        Ok(())
    }

    /// Gathers what the thread has compressed so far, without waiting.
    fn collect(&mut self) -> std::io::Result<()> {
        while let Ok(piece) = self.rx.try_recv() {
            self.receive(piece)?;
        }
        Ok(())
    }

    /// The compressed size so far: bytes produced, plus an estimate for the input not
    /// compressed yet (at the ratio seen so far, else 1:4).
    pub fn estimated_len(&self) -> u64 {
        let waiting = self.raw_sent - self.raw_done + self.pending.len() as u64;
        let estimate = if self.raw_done > 0 {
            (waiting as f64 * self.compressed_done as f64 / self.raw_done as f64) as u64
        } else {
            waiting / 4
        };
        self.taken + self.ready.len() as u64 + estimate + (self.members_sent - self.members_done)
    }

    /// Compressed bytes produced and not taken yet.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Takes the compressed bytes produced so far.
    pub fn take(&mut self) -> std::io::Result<Vec<u8>> {
        self.collect()?;
        let out = std::mem::take(&mut self.ready);
        self.taken += out.len() as u64;
        Ok(out)
    }

    /// Ends the stream; returns the compressed bytes not taken yet and the stream's total size.
    pub fn finish(mut self) -> std::io::Result<(Vec<u8>, u64)> {
        self.send_pending()?;
        drop(self.tx.take());
        while let Ok(piece) = self.rx.recv() {
            self.receive(piece)?;
        }
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| stopped())?;
        }
        let tail = std::mem::take(&mut self.ready);
        let total = self.taken + tail.len() as u64;
        Ok((tail, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_stream_is_the_input_gzipped_whatever_is_taken_on_the_way() {
        let line = b"{\"op\":\"c\",\"after\":{\"id\":12345,\"note\":\"some text that repeats\"}}\n";
        let mut gz = BackgroundGzip::new(3).unwrap();
        let mut input = Vec::new();
        let mut out = Vec::new();
        for i in 0..60_000 {
            gz.write(line).unwrap();
            input.extend_from_slice(line);
            if i % 7_000 == 0 {
                out.extend(gz.take().unwrap());
            }
        }
        assert!(gz.estimated_len() > 0);
        let (tail, total) = gz.finish().unwrap();
        out.extend(tail);
        assert_eq!(total as usize, out.len());
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&out[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, input);
        // Byte for byte what a GzEncoder on this thread writes.
        let mut direct = GzEncoder::new(Vec::new(), flate2::Compression::new(3));
        direct.write_all(&input).unwrap();
        assert_eq!(direct.finish().unwrap(), out);
    }

    #[test]
    fn a_large_write_is_handed_over_in_chunks() {
        // Three and a half chunks of text in one write: never more than a chunk waits here,
        // and the stream is still the input gzipped.
        let input: Vec<u8> = (0..CHUNK * 7 / 2).map(|i| b'a' + (i % 23) as u8).collect();
        let mut gz = BackgroundGzip::new(1).unwrap();
        gz.write(&input).unwrap();
        assert!(gz.pending.len() < CHUNK, "{} bytes wait", gz.pending.len());
        assert_eq!(gz.pending.len(), input.len() % CHUNK);
        let (out, _) = gz.finish().unwrap();
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&out[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, input);
    }

    #[test]
    fn an_empty_stream_is_a_valid_gzip_file() {
        let (tail, total) = BackgroundGzip::new(1).unwrap().finish().unwrap();
        assert_eq!(total as usize, tail.len());
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&tail[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back.is_empty());
    }
}
