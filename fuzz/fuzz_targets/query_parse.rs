//! The query reader alone (`dns::query::parse`): header, question, every
//! record skipped, the OPT record and its options, ECS (RFC 7871) among
//! them. It must never panic, and what it reads must hold together: a
//! question inside the packet, at most 255 bytes of name; an ECS subnet
//! no longer than its family, with no bits set past its prefix.

#![no_main]

use std::net::IpAddr;

use inferdns::dns::query::{self, Ecs, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|packet: &[u8]| {
    let Ok(query) = query::parse(packet) else {
        return;
    };
    assert_eq!(query.id, u16::from_be_bytes([packet[0], packet[1]]));
    if let Some(question) = query.question {
        assert!(
            question.name_len <= 255,
            "a name of {} bytes",
            question.name_len
        );
        assert_eq!(question.wire.len(), question.name_len + 4);
        assert_eq!(
            &packet[HEADER_LEN..HEADER_LEN + question.wire.len()],
            question.wire
        );
        let labels: usize = question.labels().map(|l| 1 + l.len()).sum();
        assert_eq!(labels + 1, question.name_len, "the labels cover the name");
    }
    if let Some(edns) = query.edns {
        assert!(edns.payload >= 512);
        if let Ecs::Subnet(subnet) = edns.ecs {
            let (bits, width) = match subnet.addr {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            };
            assert!(
                subnet.source_prefix <= width,
                "prefix {}",
                subnet.source_prefix
            );
            let past_prefix = bits
                .checked_shl(u32::from(subnet.source_prefix))
                .unwrap_or(0);
            assert_eq!(past_prefix, 0, "bits set past the prefix of {subnet:?}");
        }
    }
});
