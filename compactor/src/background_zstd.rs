//! A Zstandard stream compressed on its own thread (`JSONL_COMPRESSION=zstd`), so compressing
//! a part's JSONL overlaps with parsing the staged lines and encoding the typed formats on the
//! caller's thread. The same interface as [`crate::background_gzip::BackgroundGzip`].
//!
//! Input is handed over in chunks of [`CHUNK`] bytes through a channel of [`IN_FLIGHT`] chunks
//! (the caller blocks when the thread falls that far behind), so memory stays bounded. The output
//! is the same zstd frame a [`zstd::stream::write::Encoder`] fed on the caller's thread would produce.

use std::io::Write;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Bytes gathered before a chunk goes to the thread.
pub const CHUNK: usize = 1024 * 1024;
/// Chunks handed over and not compressed yet, at most.
pub const IN_FLIGHT: usize = 4;

/// What the thread sends back: for a chunk of `raw` input bytes, the compressed bytes it produced.
type Piece = std::io::Result<(u64, Vec<u8>)>;

/// A zstd stream being compressed on a background thread.
pub struct BackgroundZstd {
    pending: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
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
}

fn stopped() -> std::io::Error {
    std::io::Error::other("the zstd thread stopped")
}

impl BackgroundZstd {
    /// Starts the thread, compressing at `level` (1 to 19).
    pub fn new(level: i32) -> std::io::Result<Self> {
        let (tx, input) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (output, rx) = mpsc::channel::<Piece>();
        let thread = std::thread::Builder::new()
            .name("jsonl-zstd".into())
            .spawn(move || {
                let mut enc = match zstd::stream::write::Encoder::new(Vec::new(), level) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = output.send(Err(e));
                        return;
                    }
                };
                for chunk in input {
                    let piece = enc
                        .write_all(&chunk)
                        .map(|()| (chunk.len() as u64, std::mem::take(enc.get_mut())));
                    let failed = piece.is_err();
                    if output.send(piece).is_err() || failed {
                        return;
                    }
                }
                // The caller closed the input: the stream's end.
                let _ = output.send(enc.finish().map(|tail| (0, tail)));
            })?;
        Ok(BackgroundZstd {
            pending: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            rx,
            thread: Some(thread),
            ready: Vec::new(),
            taken: 0,
            raw_sent: 0,
            raw_done: 0,
            compressed_done: 0,
        })
    }

    /// Appends `bytes` to the stream.
    pub fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while crate::background_gzip::fill_chunk(&mut self.pending, &mut bytes, CHUNK) {
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
            .send(chunk)
            .map_err(|_| stopped())?;
        self.collect()
    }

    fn receive(&mut self, piece: Piece) -> std::io::Result<()> {
        let (raw, bytes) = piece?;
        self.raw_done += raw;
        self.compressed_done += bytes.len() as u64;
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
    /// compressed yet (at the ratio seen so far, else 1:4; zstd may hold a block's input
    /// before it writes anything, so input with no output yet counts as not compressed).
    pub fn estimated_len(&self) -> u64 {
        let waiting = self.raw_sent - self.raw_done + self.pending.len() as u64;
        let estimate = if self.raw_done > 0 && self.compressed_done > 0 {
            (waiting as f64 * self.compressed_done as f64 / self.raw_done as f64) as u64
        } else {
            (waiting + self.raw_done) / 4
        };
        self.taken + self.ready.len() as u64 + estimate
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

    #[test]
    fn the_stream_is_the_input_zstd_compressed_whatever_is_taken_on_the_way() {
        let line = b"{\"op\":\"c\",\"after\":{\"id\":12345,\"note\":\"some text that repeats\"}}\n";
        let mut z = BackgroundZstd::new(3).unwrap();
        let mut input = Vec::new();
        let mut out = Vec::new();
        for i in 0..60_000u32 {
            z.write(line).unwrap();
            z.write(&i.to_le_bytes()).unwrap();
            input.extend_from_slice(line);
            input.extend_from_slice(&i.to_le_bytes());
            if i % 7_000 == 0 {
                out.extend(z.take().unwrap());
            }
        }
        assert!(z.estimated_len() > 0);
        let (tail, total) = z.finish().unwrap();
        out.extend(tail);
        assert_eq!(total as usize, out.len());
        assert_eq!(&out[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
        assert!(out.len() < input.len() / 4, "compressed");
        assert_eq!(zstd::stream::decode_all(&out[..]).unwrap(), input);
        // Byte for byte what an Encoder on this thread writes.
        let mut direct = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        direct.write_all(&input).unwrap();
        assert_eq!(direct.finish().unwrap(), out);
    }

    #[test]
    fn an_empty_stream_is_a_valid_zstd_frame() {
        let (tail, total) = BackgroundZstd::new(3).unwrap().finish().unwrap();
        assert_eq!(total as usize, tail.len());
        assert!(zstd::stream::decode_all(&tail[..]).unwrap().is_empty());
    }
}
