//! The fuzz entry point over seeded random inputs: random bytes and mutated
//! valid queries must never panic the request handler.

use hickory_proto::{
    op::{Edns, Message, Query},
    rr::{Name, RecordType},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (name, record_type) in [
        ("web.shop.ployz.internal.", RecordType::A),
        ("_80._tcp.web.shop.ployz.internal.", RecordType::SRV),
        ("web.shop.ployz.internal.", RecordType::SRV),
        ("3.web.shop.ployz.internal.", RecordType::AAAA),
        ("ployz.internal.", RecordType::ANY),
        ("nope.ployz.internal.", RecordType::A),
        ("example.com.", RecordType::MX),
    ] {
        for edns in [false, true] {
            let mut message = Message::new();
            message.set_id(0x4242).add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                record_type,
            ));
            if edns {
                let mut options = Edns::new();
                options.set_max_payload(4096);
                message.set_edns(options);
            }
            seeds.push(message.to_vec().expect("encode"));
        }
    }
    seeds
}

#[test]
fn dns_request_survives_random_and_mutated_inputs() {
    let mut rng = StdRng::seed_from_u64(0x9107);
    let seeds = seeds();
    for seed in &seeds {
        ployz_dns::fuzz::dns_request(seed);
    }
    for round in 0..6000u32 {
        let input: Vec<u8> = if round % 3 == 0 {
            let length = rng.random_range(0..300);
            (0..length).map(|_| rng.random()).collect()
        } else {
            let mut input = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..6) {
                match rng.random_range(0..4) {
                    0 if !input.is_empty() => {
                        let index = rng.random_range(0..input.len());
                        input[index] = rng.random();
                    }
                    1 if !input.is_empty() => {
                        let at = rng.random_range(0..input.len());
                        input.truncate(at);
                    }
                    2 => {
                        let at = rng.random_range(0..=input.len());
                        input.insert(at, rng.random());
                    }
                    _ => input.extend((0..rng.random_range(0..20)).map(|_| rng.random::<u8>())),
                }
            }
            input
        };
        ployz_dns::fuzz::dns_request(&input);
    }
}
