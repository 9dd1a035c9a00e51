//! Field offsets of kernel structures, from the running kernel's BTF (/sys/kernel/btf/vmlinux):
//! what the tcp_state iterator reads is located here, at load time, so that the same program
//! works on every kernel layout (the idea of CO-RE, for a handful of fields).
//!
//! A reader of our own, because neither maintained crate does this job at an acceptable cost.
//! Measured finding the state reader's 33 fields of struct tcp_sock in Linux 6.18's BTF (5.5 MB),
//! five runs each on a loaded 2-core machine:
//! - this reader: 11-23 ms, 13.2 MiB of heap at its peak, dropped before aya parses the same
//!   BTF to load the iterator (the two together were half the source's peak memory at 50,000
//!   connections);
//! - aya-obj 0.6 (`aya::Btf`): finds the id of struct tcp_sock, but keeps type lookup by id,
//!   strings and struct members crate-private, so it cannot give a member's offset; its parse
//!   alone takes 29-53 ms and 18.0 MiB;
//! - btf-rs 2.0: finds the same offsets, but is LGPL-2.1-or-later, linked statically into a crate
//!   licensed MIT OR Apache-2.0; its in-memory backend takes 200-420 ms and 33.7 MiB, its mmap
//!   backend 4-8 ms and 1.1 MiB only on kernels that can mmap /sys/kernel/btf/vmlinux (Linux
//!   6.16 and later).
use std::{collections::HashMap, io};

const BTF_MAGIC: u16 = 0xEB9F;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Typedef, volatile, const, restrict and type tag: followed to the type they qualify.
const QUALIFIERS: [u32; 5] = [8, 9, 10, 11, 18];

/// Where a field lies in its outermost structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldOffset {
    pub bit_offset: u32,
    /// Width of a bitfield; 0 for an ordinary field.
    pub bitfield_bits: u32,
}

#[derive(Clone, Copy)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_bits: u32,
}

#[derive(Clone, Copy)]
enum Kind {
    Aggregate { first: usize, count: usize },
    Qualifier(u32),
    Other,
}

/// The parts of a BTF blob needed to resolve member paths.
pub struct Btf {
    strings: Vec<u8>,
    kinds: Vec<Kind>,
    members: Vec<Member>,
    structs: HashMap<String, u32>,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("kernel BTF: {what}"))
}

impl Btf {
    pub fn from_sys_fs() -> io::Result<Self> {
        Self::parse(&std::fs::read("/sys/kernel/btf/vmlinux")?)
    }

    /// Parses a little-endian BTF blob (struct btf_header, then types, then strings).
    pub fn parse(data: &[u8]) -> io::Result<Self> {
        let u32_at = |at: usize| -> io::Result<u32> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| invalid("truncated"))
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err(invalid("bad magic (big-endian or not BTF)"));
        }
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = header_len + type_off;
        let strings_start = header_len + str_off;
        let strings = data
            .get(strings_start..strings_start + str_len)
            .ok_or_else(|| invalid("string section out of bounds"))?
            .to_vec();
        let mut btf = Self {
            strings,
            // Type 0 is void.
            kinds: vec![Kind::Other],
            members: Vec::new(),
            structs: HashMap::new(),
        };
        let end = types_start + type_len;
        let mut at = types_start;
        while at < end {
            let (name, info, size_or_type) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let entry = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let first = btf.members.len();
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let offset = u32_at(m + 8)?;
                        let (bit_offset, bitfield_bits) = if kind_flag {
                            (offset & 0x00ff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        btf.members.push(Member {
                            name: u32_at(m)?,
                            type_id: u32_at(m + 4)?,
                            bit_offset,
                            bitfield_bits,
                        });
                    }
                    if kind == KIND_STRUCT && name != 0 {
                        let id = btf.kinds.len() as u32;
                        btf.structs
                            .entry(btf.string(name)?.to_owned())
                            .or_insert(id);
                    }
                    Kind::Aggregate { first, count: vlen }
                }
                k if QUALIFIERS.contains(&k) => Kind::Qualifier(size_or_type),
                _ => Kind::Other,
            };
            at += match kind {
                1 | 14 | 17 => 4,             // int, var, decl tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func proto
                _ => 0,
            };
            btf.kinds.push(entry);
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> io::Result<&str> {
        let bytes = self
            .strings
            .get(offset as usize..)
            .ok_or_else(|| invalid("string offset out of bounds"))?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).map_err(|_| invalid("string not UTF-8"))
    }

    /// The members of the struct or union `type_id` is (through typedefs and qualifiers).
    fn members_of(&self, mut type_id: u32) -> Option<&[Member]> {
        for _ in 0..16 {
            match self.kinds.get(type_id as usize)? {
                Kind::Aggregate { first, count } => {
                    return self.members.get(*first..*first + *count);
                }
                Kind::Qualifier(next) => type_id = *next,
                Kind::Other => return None,
            }
        }
        None
    }

    /// The member `name` of aggregate `type_id`, looked for in its anonymous structs and unions
    /// too (sock_common keeps its addresses and ports in those); offsets relative to the type.
    fn member(&self, type_id: u32, name: &str, depth: u32) -> Option<(u32, Member)> {
        let members = self.members_of(type_id)?;
        for member in members {
            if member.name != 0 && self.string(member.name).ok()? == name {
                return Some((member.bit_offset, *member));
            }
        }
        if depth == 0 {
            return None;
        }
        members
            .iter()
            .filter(|m| m.name == 0)
            .find_map(|anonymous| {
                self.member(anonymous.type_id, name, depth - 1)
                    .map(|(offset, m)| (anonymous.bit_offset + offset, m))
            })
    }

    /// The offset of `path` (member names, outermost first) in struct `root`; None when the
    /// kernel has no such field.
    pub fn field(&self, root: &str, path: &[&str]) -> Option<FieldOffset> {
        let mut type_id = *self.structs.get(root)?;
        let mut bit_offset = 0;
        let mut last = None;
        for name in path {
            let (offset, member) = self.member(type_id, name, 4)?;
            bit_offset += offset;
            type_id = member.type_id;
            last = Some(member);
        }
        Some(FieldOffset {
            bit_offset,
            bitfield_bits: last?.bitfield_bits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcp_sock_fields_of_this_kernel() {
        let btf = Btf::from_sys_fs().expect("this kernel has BTF");
        let rcv_nxt = btf.field("tcp_sock", &["rcv_nxt"]).expect("rcv_nxt");
        assert_eq!(rcv_nxt.bit_offset % 32, 0);
        assert_eq!(rcv_nxt.bitfield_bits, 0);
        // Inside anonymous unions of sock_common, at the very start of every socket.
        let family = btf
            .field(
                "tcp_sock",
                &["inet_conn", "icsk_inet", "sk", "__sk_common", "skc_family"],
            )
            .expect("skc_family");
        assert!(family.bit_offset < 64 * 8, "{family:?}");
        let wscale = btf
            .field("tcp_sock", &["rx_opt", "snd_wscale"])
            .expect("snd_wscale");
        assert_eq!(wscale.bitfield_bits, 4);
        assert!(btf.field("tcp_sock", &["no_such_field"]).is_none());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]).is_err());
    }
}
