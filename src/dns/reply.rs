//! Writing a response: header, the question as received, the records of
//! each section with owner and RDATA names compressed (RFC 1035 §4.1.4),
//! and the OPT record. A response never exceeds the size it is given: the
//! OPT record's room is kept aside first, a record that does not fit is
//! taken back whole, and an answer or authority section that does not fit
//! leaves a TC=1 response with the question and the OPT record only.

use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use super::query::{HEADER_LEN, Question};

/// Names kept as compression targets: enough for any answer we give.
const TARGETS: usize = 64;
/// Compression pointers reach only the first 16 KiB of a message.
const POINTER_LIMIT: usize = 0x3fff;

/// The header fields of a response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    pub id: u16,
    pub opcode: u8,
    pub authoritative: bool,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The full response code; the bits above 4 go into the OPT record.
    pub rcode: u16,
}

/// The OPT record of a response.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opt<'a> {
    pub payload: u16,
    pub dnssec_ok: bool,
    pub nsid: Option<&'a [u8]>,
    /// The ECS option to echo: (family, source, scope, address bytes).
    pub ecs: Option<(u16, u8, u8, [u8; 16])>,
}

impl Opt<'_> {
    pub(super) fn len(&self) -> usize {
        let nsid = self.nsid.map_or(0, |n| 4 + n.len());
        let ecs = self
            .ecs
            .map_or(0, |(_, source, _, _)| 8 + usize::from(source).div_ceil(8));
        11 + nsid + ecs
    }
}

/// The sections of a message, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Answer = 0,
    Authority = 1,
    Additional = 2,
}

/// A record did not fit: it was taken back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Writes one response into a caller's buffer.
pub struct Writer<'b, 'o> {
    buf: &'b mut Vec<u8>,
    /// Where records must end to leave room for the OPT record.
    limit: usize,
    /// Where the question ends.
    question_end: usize,
    counts: [u16; 3],
    section: Section,
    /// Offsets of names (and of each of their suffixes) already written.
    targets: [u16; TARGETS],
    targets_len: usize,
    header: Header,
    opt: Option<Opt<'o>>,
    truncated: bool,
}

impl<'b, 'o> Writer<'b, 'o> {
    /// Starts a response of at most `max_size` bytes (at least 512) with
    /// `question` echoed, if any.
    pub fn new(
        buf: &'b mut Vec<u8>,
        header: Header,
        question: Option<&Question<'_>>,
        opt: Option<Opt<'o>>,
        max_size: usize,
    ) -> Self {
        buf.clear();
        buf.extend_from_slice(&[0; HEADER_LEN]);
        // The header, the question and the OPT record always fit: what does
        // not (a long NSID, then the ECS echo) is left out of the OPT.
        let question_len = question.map_or(0, |q| q.wire.len());
        let opt = opt.map(|mut o| {
            if HEADER_LEN + question_len + o.len() > max_size {
                o.nsid = None;
            }
            if HEADER_LEN + question_len + o.len() > max_size {
                o.ecs = None;
            }
            o
        });
        let mut writer = Writer {
            limit: max_size.saturating_sub(opt.map_or(0, |o| o.len())),
            buf,
            question_end: HEADER_LEN,
            counts: [0; 3],
            section: Section::Answer,
            targets: [0; TARGETS],
            targets_len: 0,
            header,
            opt,
            truncated: false,
        };
        if let Some(q) = question {
            // A name is at most 255 bytes: the question always fits in 512.
            writer.buf.extend_from_slice(q.wire);
            let mut at = HEADER_LEN;
            for label in q.labels() {
                writer.target(at);
                at += 1 + label.len();
            }
            writer.question_end = writer.buf.len();
        }
        writer
    }

    /// Appends `record` to `section` (sections in order); takes it back
    /// and returns `Full` when it does not fit.
    pub fn record(&mut self, section: Section, record: &Record) -> Result<(), Full> {
        debug_assert!(section >= self.section, "sections are written in order");
        self.section = section;
        let start = self.buf.len();
        let targets = self.targets_len;
        let written = self.write_record(record);
        if written.is_err() || self.buf.len() > self.limit {
            self.buf.truncate(start);
            self.targets_len = targets;
            return Err(Full);
        }
        self.counts[section as usize] += 1;
        Ok(())
    }

    /// Appends every record of a section that must be whole (answer,
    /// authority): if one does not fit, the response is truncated.
    pub fn whole<'r>(
        &mut self,
        section: Section,
        records: impl IntoIterator<Item = &'r Record>,
    ) -> Result<(), Full> {
        for record in records {
            if self.record(section, record).is_err() {
                self.truncate();
                return Err(Full);
            }
        }
        Ok(())
    }

    /// Appends what fits of an optional section (additional): the rest is
    /// left out without truncating.
    pub fn optional<'r>(
        &mut self,
        section: Section,
        records: impl IntoIterator<Item = &'r Record>,
    ) {
        for record in records {
            if self.record(section, record).is_err() {
                return;
            }
        }
    }

    /// Drops every record and sets TC=1 (RFC 2181 §9): the client retries
    /// over TCP.
    pub fn truncate(&mut self) {
        self.buf.truncate(self.question_end);
        self.counts = [0; 3];
        self.truncated = true;
        let question_targets = self.targets[..self.targets_len]
            .iter()
            .take_while(|t| usize::from(**t) < self.question_end)
            .count();
        self.targets_len = question_targets;
    }

    /// Writes the header and the OPT record; the response is in the buffer.
    pub fn finish(self) -> usize {
        let Writer {
            buf,
            question_end,
            mut counts,
            header,
            opt,
            truncated,
            ..
        } = self;
        if let Some(opt) = opt {
            write_opt(buf, &opt, header.rcode);
            counts[Section::Additional as usize] += 1;
        }
        let h = &mut buf[..HEADER_LEN];
        h[0..2].copy_from_slice(&header.id.to_be_bytes());
        h[2] = 0x80
            | (header.opcode & 0x0f) << 3
            | u8::from(header.authoritative) << 2
            | u8::from(truncated) << 1
            | u8::from(header.recursion_desired);
        h[3] = u8::from(header.checking_disabled) << 4 | (header.rcode & 0x0f) as u8;
        let questions = u16::from(question_end > HEADER_LEN);
        h[4..6].copy_from_slice(&questions.to_be_bytes());
        for (i, count) in counts.iter().enumerate() {
            h[6 + 2 * i..8 + 2 * i].copy_from_slice(&count.to_be_bytes());
        }
        buf.len()
    }

    fn write_record(&mut self, record: &Record) -> Result<(), Full> {
        self.name(&record.name, true);
        self.u16(u16::from(record.record_type()));
        self.u16(u16::from(record.dns_class));
        self.buf.extend_from_slice(&record.ttl.to_be_bytes());
        let length_at = self.buf.len();
        self.u16(0);
        match &record.data {
            RData::A(a) => self.buf.extend_from_slice(&a.0.octets()),
            RData::AAAA(aaaa) => self.buf.extend_from_slice(&aaaa.0.octets()),
            // The RFC 1035 types: names in their RDATA may be compressed.
            RData::CNAME(name) => self.name(&name.0, true),
            RData::NS(name) => self.name(&name.0, true),
            RData::PTR(name) => self.name(&name.0, true),
            RData::MX(mx) => {
                self.u16(mx.preference);
                self.name(&mx.exchange, true);
            }
            RData::SOA(soa) => {
                self.name(&soa.mname, true);
                self.name(&soa.rname, true);
                for value in [
                    soa.serial,
                    soa.refresh as u32,
                    soa.retry as u32,
                    soa.expire as u32,
                    soa.minimum,
                ] {
                    self.buf.extend_from_slice(&value.to_be_bytes());
                }
            }
            // Every other type is written as hickory writes it, alone, so
            // that none of its names is compressed (RFC 3597 §4).
            other => {
                let mut rdata = Vec::new();
                other
                    .emit(&mut BinEncoder::new(&mut rdata))
                    .map_err(|_| Full)?;
                self.buf.extend_from_slice(&rdata);
            }
        }
        let length = u16::try_from(self.buf.len() - length_at - 2).map_err(|_| Full)?;
        self.buf[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
        Ok(())
    }

    fn u16(&mut self, value: u16) {
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    /// Writes `name`, ending in a pointer to the longest suffix already in
    /// the message when `compress` is set.
    fn name(&mut self, name: &Name, compress: bool) {
        let mut labels: [&[u8]; 128] = [&[]; 128];
        let mut n = 0;
        for label in name.iter().take(128) {
            labels[n] = label;
            n += 1;
        }
        for i in 0..n {
            if compress && let Some(pointer) = self.find(&labels[i..n]) {
                self.u16(0xc000 | pointer);
                return;
            }
            self.target(self.buf.len());
            self.buf.push(labels[i].len() as u8);
            self.buf.extend_from_slice(labels[i]);
        }
        self.buf.push(0);
    }

    fn target(&mut self, at: usize) {
        if at <= POINTER_LIMIT && self.targets_len < TARGETS {
            self.targets[self.targets_len] = at as u16;
            self.targets_len += 1;
        }
    }

    /// A written name equal to `labels` (ASCII case ignored).
    fn find(&self, labels: &[&[u8]]) -> Option<u16> {
        self.targets[..self.targets_len]
            .iter()
            .copied()
            .find(|&t| name_at_equals(self.buf, usize::from(t), labels))
    }
}

/// Whether the (possibly compressed) name at `at` in `message` is `labels`.
fn name_at_equals(message: &[u8], mut at: usize, labels: &[&[u8]]) -> bool {
    let mut labels = labels.iter();
    // Pointers only go backwards, so a bounded number of hops suffices.
    for _ in 0..256 {
        let Some(&len) = message.get(at) else {
            return false;
        };
        if len & 0xc0 == 0xc0 {
            let Some(&low) = message.get(at + 1) else {
                return false;
            };
            at = usize::from(u16::from_be_bytes([len & 0x3f, low]));
            continue;
        }
        let len = usize::from(len);
        match labels.next() {
            None => return len == 0,
            Some(label) => {
                let Some(written) = message.get(at + 1..at + 1 + len) else {
                    return false;
                };
                if len == 0 || !written.eq_ignore_ascii_case(label) {
                    return false;
                }
                at += 1 + len;
            }
        }
    }
    false
}

pub(super) fn write_opt(buf: &mut Vec<u8>, opt: &Opt<'_>, rcode: u16) {
    buf.push(0); // the root
    buf.extend_from_slice(&41u16.to_be_bytes());
    buf.extend_from_slice(&opt.payload.to_be_bytes());
    buf.push((rcode >> 4) as u8);
    buf.push(0); // version
    buf.extend_from_slice(&(u16::from(opt.dnssec_ok) << 15).to_be_bytes());
    let length_at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    if let Some(nsid) = opt.nsid {
        buf.extend_from_slice(&3u16.to_be_bytes());
        buf.extend_from_slice(&(nsid.len() as u16).to_be_bytes());
        buf.extend_from_slice(nsid);
    }
    if let Some((family, source, scope, addr)) = opt.ecs {
        let bytes = usize::from(source).div_ceil(8);
        buf.extend_from_slice(&8u16.to_be_bytes());
        buf.extend_from_slice(&((4 + bytes) as u16).to_be_bytes());
        buf.extend_from_slice(&family.to_be_bytes());
        buf.extend_from_slice(&[source, scope]);
        buf.extend_from_slice(&addr[..bytes]);
    }
    let length = (buf.len() - length_at - 2) as u16;
    buf[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::{A, CNAME, TXT};

    use super::*;
    use crate::dns::query;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn question_packet(qname: &str) -> Vec<u8> {
        let mut q = vec![0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in qname.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend(label.as_bytes());
        }
        q.extend([0, 0, 1, 0, 1]);
        q
    }

    fn header() -> Header {
        Header {
            id: 7,
            authoritative: true,
            ..Header::default()
        }
    }

    #[test]
    fn owner_names_point_at_the_question_whatever_its_case() {
        let packet = question_packet("WWW.Inference.example.com.");
        let q = query::parse(&packet).unwrap();
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf, header(), q.question.as_ref(), None, 512);
        let a = Record::from_rdata(
            name("www.inference.example.com."),
            300,
            RData::A(A::new(192, 0, 2, 80)),
        );
        w.whole(Section::Answer, [&a]).unwrap();
        let len = w.finish();
        // 12 header + 31 question + 16 answer (a pointer instead of the name).
        assert_eq!(len, 12 + 31 + 16);
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.answers[0].name, name("WWW.Inference.example.com."));
    }

    #[test]
    fn cname_targets_and_later_owners_share_suffixes() {
        let packet = question_packet("docs.inference.example.com.");
        let q = query::parse(&packet).unwrap();
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf, header(), q.question.as_ref(), None, 512);
        let cname = Record::from_rdata(
            name("docs.inference.example.com."),
            300,
            RData::CNAME(CNAME(name("www.inference.example.com."))),
        );
        let a = Record::from_rdata(
            name("www.inference.example.com."),
            300,
            RData::A(A::new(192, 0, 2, 80)),
        );
        w.whole(Section::Answer, [&cname, &a]).unwrap();
        let len = w.finish();
        // CNAME: pointer owner, "www" + pointer target; A: pointer owner.
        assert_eq!(len, 12 + 32 + (2 + 10 + 6) + (2 + 10 + 4));
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.answers.len(), 2);
        assert_eq!(m.answers[1].name, name("www.inference.example.com."));
    }

    #[test]
    fn a_long_nsid_is_left_out_rather_than_overflowing() {
        let long = format!(
            "{}.inference.example.com.",
            vec!["n".repeat(63); 3].join(".")
        );
        let packet = question_packet(&long);
        let q = query::parse(&packet).unwrap();
        let nsid = [b'x'; 300];
        let opt = Opt {
            payload: 1232,
            nsid: Some(&nsid),
            ..Opt::default()
        };
        let mut buf = Vec::new();
        let len = Writer::new(&mut buf, header(), q.question.as_ref(), Some(opt), 512).finish();
        assert!(len <= 512, "{len}");
        assert_eq!(len, 12 + q.question.unwrap().wire.len() + 11);
        assert!(Message::from_vec(&buf).unwrap().edns.is_some());
    }

    #[test]
    fn what_does_not_fit_is_taken_back_and_truncates() {
        let packet = question_packet("big.inference.example.com.");
        let q = query::parse(&packet).unwrap();
        let txt = Record::from_rdata(
            name("big.inference.example.com."),
            0,
            RData::TXT(TXT::new(vec!["x".repeat(250), "y".repeat(250)])),
        );
        let opt = Opt {
            payload: 1232,
            ..Opt::default()
        };
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf, header(), q.question.as_ref(), Some(opt), 512);
        assert_eq!(w.whole(Section::Answer, [&txt]), Err(Full));
        let len = w.finish();
        assert_eq!(len, buf.len());
        assert_eq!(len, 12 + 31 + 11, "question and OPT only");
        let m = Message::from_vec(&buf).unwrap();
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert!(m.edns.is_some());
    }
}
