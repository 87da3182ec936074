//! Reads a TFRecord file written by another implementation (PyPI `tfrecord`), not by our writer.

use std::io::Read;

#[test]
fn reads_trajectories_written_by_the_python_tfrecord_package() {
    let gz = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bair_two_trajectories_pytfrecord.tfrecords.gz");
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let path = std::env::temp_dir().join(format!("pytfrecord-{}.tfrecords", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let videos = vq_data::bair::read_file(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(videos.len(), 2);
    for (v, s) in videos.iter().zip([0usize, 5]) {
        assert_eq!(v.dim(), (30, 64, 64, 3));
        for (t, y, x, c) in [(0, 0, 0, 0), (3, 10, 20, 2), (29, 63, 63, 1)] {
            assert_eq!(
                usize::from(v[[t, y, x, c]]),
                x % 64 + t + s,
                "({t},{y},{x},{c})"
            );
        }
    }
}
