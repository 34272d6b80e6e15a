//! Following the frames of one direction of a link, to flip a byte of a chosen frame ([`super::FrameFlip`]).

use super::{FrameFlip, FramePart};

/// Follows the frames of one direction and flips the byte a [`FrameFlip`] names. A frame's first 8 bytes (length
/// prefix and tag) are held back until all have arrived, so that the prefix can still be changed once the tag says
/// which frame it is. After the flip the rest passes untouched.
pub(super) struct FrameFlipper {
    flip: FrameFlip,
    /// Frames of the flip's tag seen so far.
    seen: u32,
    /// The current frame's header bytes received so far (while `body_left` is 0).
    header: Vec<u8>,
    /// Body bytes of the current frame after its tag still to pass.
    body_left: u64,
    /// Offset, in the bytes still to pass, of the body byte to flip.
    flip_in: Option<u64>,
    /// Whether the flip happened (and tracking stopped).
    done: bool,
    /// Set when the flip happens, until [`FrameFlipper::take_flipped`].
    flipped: bool,
}

/// Bytes of a frame's length prefix and tag.
const FRAME_HEADER: usize = 8;

impl FrameFlipper {
    pub(super) fn new(flip: FrameFlip) -> FrameFlipper {
        FrameFlipper {
            flip,
            seen: 0,
            header: Vec::with_capacity(FRAME_HEADER),
            body_left: 0,
            flip_in: None,
            done: false,
            flipped: false,
        }
    }

    /// The bytes to forward for `input` (an incomplete header at its end is kept for the next call).
    pub(super) fn pass(&mut self, mut input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + FRAME_HEADER);
        while !input.is_empty() {
            if self.done {
                out.extend_from_slice(input);
                break;
            }
            if self.body_left == 0 {
                let take = (FRAME_HEADER - self.header.len()).min(input.len());
                self.header.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.header.len() == FRAME_HEADER {
                    self.start_frame(&mut out);
                }
                continue;
            }
            let take = (self.body_left.min(input.len() as u64)) as usize;
            let start = out.len();
            out.extend_from_slice(&input[..take]);
            if let Some(at) = self.flip_in {
                if at < take as u64 {
                    out[start + at as usize] ^= self.flip.xor;
                    self.finish();
                } else {
                    self.flip_in = Some(at - take as u64);
                }
            }
            self.body_left -= take as u64;
            input = &input[take..];
        }
        out
    }

    /// A whole header is in: decides whether this is the frame to flip, and forwards the header.
    fn start_frame(&mut self, out: &mut Vec<u8>) {
        let mut header = std::mem::take(&mut self.header);
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
        let tag = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        self.body_left = u64::from(len).saturating_sub(4);
        if tag == self.flip.tag {
            if self.seen == self.flip.nth {
                match self.flip.part {
                    FramePart::LengthPrefix => header[3] ^= self.flip.xor,
                    FramePart::Tag => header[4] ^= self.flip.xor,
                    FramePart::Field(at) if u64::from(at) < self.body_left => self.flip_in = Some(u64::from(at)),
                    FramePart::Field(_) => {}
                }
                if self.flip_in.is_none() {
                    self.finish();
                }
            }
            self.seen += 1;
        }
        out.extend_from_slice(&header);
        self.header = header;
        self.header.clear();
    }

    fn finish(&mut self) {
        self.done = true;
        self.flipped = true;
        self.flip_in = None;
    }

    /// Whether the flip happened since the last call.
    pub(super) fn take_flipped(&mut self) -> bool {
        std::mem::take(&mut self.flipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two frames of one tag, then one of another, fed in pieces as small as one byte: the flip lands on the
    /// named byte of the named frame only, whatever the pieces, and nothing is lost or added.
    #[test]
    fn a_frame_flip_finds_its_frame_across_any_split() {
        use crate::ranges::IndexRange;
        use crate::wire::codec::encode_frame;
        use crate::wire::{Chunk, Message, Need};
        let mut stream = Vec::new();
        for msg in [
            Message::Chunk(Chunk {
                index: 7,
                data: vec![0; 10],
            }),
            Message::Need(Need {
                ranges: vec![IndexRange { start: 2, count: 3 }],
            }),
            Message::Chunk(Chunk {
                index: 8,
                data: vec![0; 3],
            }),
        ] {
            encode_frame(&msg, crate::MAX_FRAME, &mut stream).unwrap();
        }
        let second_chunk = stream.len() - (8 + 4 + 8 + 3);
        let need = 4 + 26;
        let cases = [
            (
                FrameFlip {
                    tag: 4,
                    nth: 1,
                    part: FramePart::LengthPrefix,
                    xor: 1,
                },
                second_chunk + 3,
            ),
            (
                FrameFlip {
                    tag: 4,
                    nth: 1,
                    part: FramePart::Tag,
                    xor: 1,
                },
                second_chunk + 4,
            ),
            (
                FrameFlip {
                    tag: 4,
                    nth: 1,
                    part: FramePart::Field(0),
                    xor: 1,
                },
                second_chunk + 8,
            ),
            (
                FrameFlip {
                    tag: 3,
                    nth: 0,
                    part: FramePart::Field(12),
                    xor: 2,
                },
                need + 8 + 12,
            ),
        ];
        for (flip, at) in cases {
            for piece in [1, 2, 3, 7, 64] {
                let mut flipper = FrameFlipper::new(flip);
                let out: Vec<u8> = stream.chunks(piece).flat_map(|p| flipper.pass(p)).collect();
                let changed: Vec<usize> = (0..stream.len()).filter(|&i| out[i] != stream[i]).collect();
                assert_eq!(out.len(), stream.len(), "{flip:?} in pieces of {piece}");
                assert_eq!(changed, vec![at], "{flip:?} in pieces of {piece}");
                assert_eq!(out[at], stream[at] ^ flip.xor);
            }
        }
        let mut beyond = FrameFlipper::new(FrameFlip {
            tag: 4,
            nth: 2,
            part: FramePart::Tag,
            xor: 1,
        });
        assert_eq!(beyond.pass(&stream), stream, "no third Chunk, no flip");
        assert!(!beyond.take_flipped());
    }
}
