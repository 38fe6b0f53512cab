//! Response compression (`router.compress = true`): which responses, and
//! the streaming encoders. The coding a client gets is chosen by
//! [`kiln_core::compress::choose`] from its `Accept-Encoding`.

use std::io::{self, Write};

use kiln_core::compress::{Coding, MIN_LENGTH, compressible};

use crate::router::upstream::UpHead;
use crate::router::wire::Framing;

/// The coding to compress `head`'s body with, if any: a success with a
/// body (not 204, not a 206 range), not encoded already, `no-transform`
/// not asked, a compressible type, not known to be small.
pub(crate) fn coding_for(accepted: Option<Coding>, head: &UpHead) -> Option<Coding> {
    let coding = accepted?;
    if !(200..300).contains(&head.status) || head.status == 204 || head.status == 206 {
        return None;
    }
    match head.framing {
        Framing::Length(n) if n < MIN_LENGTH => return None,
        Framing::Empty => return None,
        _ => {}
    }
    let mut typed = false;
    for (name, value) in head.headers() {
        if name.eq_ignore_ascii_case("content-encoding") {
            return None;
        }
        if name.eq_ignore_ascii_case("cache-control")
            && value
                .windows(12)
                .any(|w| w.eq_ignore_ascii_case(b"no-transform"))
        {
            return None;
        }
        if name.eq_ignore_ascii_case("content-type") {
            typed = compressible(value);
        }
    }
    typed.then_some(coding)
}

/// A streaming encoder that hands back what it has compressed so far.
pub(crate) enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    /// Fast settings (nginx's `gzip_comp_level` is 1 by default): the
    /// router compresses on the request's own thread.
    pub(crate) fn new(coding: Coding) -> io::Result<Self> {
        Ok(match coding {
            Coding::Gzip => Self::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(1),
            )),
            Coding::Zstd => Self::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 1)?),
            Coding::Br => Self::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                4,
                22,
            ))),
        })
    }

    /// Compress `data` and flush: a response that streams (events, a
    /// long page) reaches the client as it comes, not when a block fills.
    pub(crate) fn push(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Self::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Self::Zstd(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Self::Br(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
        }
    }

    /// The end of the stream.
    pub(crate) fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Self::Gzip(e) => e.finish(),
            Self::Zstd(e) => e.finish(),
            Self::Br(e) => Ok(e.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn each_encoder_streams_what_its_decoder_reads_back() {
        let parts: Vec<Vec<u8>> = (0..20)
            .map(|i| {
                format!("line {i} of a page that repeats itself\n")
                    .repeat(50)
                    .into_bytes()
            })
            .collect();
        let whole: Vec<u8> = parts.concat();
        for coding in [Coding::Gzip, Coding::Zstd, Coding::Br] {
            let mut enc = Encoder::new(coding).unwrap();
            let mut out = Vec::new();
            for p in &parts {
                let got = enc.push(p).unwrap();
                // Flushed: each part yields output at once.
                assert!(!got.is_empty(), "{coding:?}");
                out.extend(got);
            }
            out.extend(enc.finish().unwrap());
            assert!(out.len() < whole.len() / 4, "{coding:?}: {}", out.len());
            let mut back = Vec::new();
            match coding {
                Coding::Gzip => {
                    flate2::read::GzDecoder::new(&out[..])
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Coding::Zstd => {
                    back = zstd::stream::decode_all(&out[..]).unwrap();
                }
                Coding::Br => {
                    brotli::Decompressor::new(&out[..], 4096)
                        .read_to_end(&mut back)
                        .unwrap();
                }
            }
            assert_eq!(back, whole, "{coding:?}");
        }
    }
}
