//! Micro-benchmarks of the in-process hot path: request validation and
//! protobuf encoding/decoding (`cargo bench --bench hot_path`).

use criterion::{Criterion, criterion_group, criterion_main};
use idemd::domain::{RecordId, check_fingerprint, check_text};
use idemd::pb;
use prost::Message;
use std::hint::black_box;

fn validation(c: &mut Criterion) {
    c.bench_function("validate namespace + key", |b| {
        b.iter(|| RecordId::parse(black_box("payments".to_string()), black_box("order-4711-charge".to_string())))
    });
    c.bench_function("validate fingerprint + nonce", |b| {
        let fingerprint = [7u8; 32];
        b.iter(|| {
            check_fingerprint(black_box(&fingerprint)).ok();
            check_text("attempt_nonce", black_box("0123456789abcdef0123456789abcdef"), 128, true).ok()
        })
    });
}

fn encoding(c: &mut Criterion) {
    let begin = pb::BeginRequest {
        namespace: "payments".into(),
        key: "order-4711-charge".into(),
        fingerprint: vec![7; 32],
        attempt_nonce: "0123456789abcdef0123456789abcdef".into(),
        ..Default::default()
    };
    let bytes = begin.encode_to_vec();
    c.bench_function("decode BeginRequest", |b| b.iter(|| pb::BeginRequest::decode(black_box(bytes.as_slice()))));
    let replay = pb::BeginResponse {
        outcome: Some(pb::begin_response::Outcome::Completed(pb::Completed {
            response: vec![b'x'; 600],
            response_code: 201,
            content_type: "application/json".into(),
            completed_at: Some(prost_types::Timestamp { seconds: 1_800_000_000, nanos: 1 }),
            expires_at: Some(prost_types::Timestamp { seconds: 1_800_086_400, nanos: 1 }),
            attempt: 1,
        })),
    };
    c.bench_function("encode a 600-byte replay", |b| b.iter(|| black_box(&replay).encode_to_vec()));
}

criterion_group!(benches, validation, encoding);
criterion_main!(benches);
