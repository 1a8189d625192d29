//! Near-duplicate detection benchmark against a planted ground truth.
//!
//! Generates a seeded synthetic corpus (~2 KB documents of Zipf-like random
//! words), plants near-duplicate copies (5-10% of words edited in short spans)
//! and hard negatives (documents sharing a 30% passage), then times MinHash
//! signatures + LSH + clustering and scores recall/precision on pairs. The
//! corpus and truth are written as JSONL/JSON so bench/dedupe_datasketch.py can
//! run datasketch on exactly the same input.
//!
//! cargo bench -p distill-curate --bench dedupe -- --docs 100000 --out DIR [--seed S] [--threads T] [--hash-seed H]

use std::collections::HashSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use distill_curate::dedupe::{Lsh, MinHasher};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Args {
    docs: usize,
    seed: u64,
    out: Option<PathBuf>,
    threads: Option<usize>,
    hash_seed: u64,
}

fn args() -> Args {
    let mut a = Args {
        docs: 100_000,
        seed: 20250101,
        out: None,
        threads: None,
        hash_seed: 1,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--docs" => a.docs = val().parse().expect("--docs N"),
            "--seed" => a.seed = val().parse().expect("--seed S"),
            "--out" => a.out = Some(PathBuf::from(val())),
            "--threads" => a.threads = Some(val().parse().expect("--threads T")),
            "--hash-seed" => a.hash_seed = val().parse().expect("--hash-seed S"),
            _ => {
                // cargo passes --bench; ignore unknown flags.
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

struct Corpus {
    docs: Vec<String>,
    /// Planted near-duplicate pairs (i < j) in final document order.
    truth: Vec<(usize, usize)>,
    /// Hard negatives: pairs that share a passage but are not duplicates.
    negatives: Vec<(usize, usize)>,
}

fn random_word(rng: &mut ChaCha8Rng) -> String {
    let len = rng.random_range(2..=9);
    (0..len)
        .map(|_| rng.random_range(b'a'..=b'z') as char)
        .collect()
}

fn generate(n: usize, seed: u64) -> Corpus {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vocab: Vec<String> = (0..30_000).map(|_| random_word(&mut rng)).collect();
    let ln_v = (vocab.len() as f64).ln();
    // Log-uniform ranks approximate Zipf's law for word frequencies.
    let sample = |rng: &mut ChaCha8Rng| -> usize {
        let u: f64 = rng.random();
        ((u * ln_v).exp() as usize)
            .saturating_sub(1)
            .min(vocab.len() - 1)
    };
    let n_dup = n / 10;
    let n_orig = n - n_dup;
    let mut docs: Vec<Vec<usize>> = (0..n_orig)
        .map(|_| {
            let len = rng.random_range(280..=340);
            (0..len).map(|_| sample(&mut rng)).collect()
        })
        .collect();
    // Hard negatives: copy a 30% passage of another document.
    let n_neg = n / 20;
    let mut negatives = Vec::new();
    for k in 0..n_neg.min(n_orig.saturating_sub(n_dup) / 2) {
        let (dst, src) = (n_dup + 2 * k, n_dup + 2 * k + 1);
        let span = docs[src].len() * 3 / 10;
        let from = rng.random_range(0..docs[src].len() - span);
        let to = rng.random_range(0..docs[dst].len() - span);
        let passage = docs[src][from..from + span].to_vec();
        docs[dst][to..to + span].copy_from_slice(&passage);
        negatives.push((dst, src));
    }
    // Near duplicates: copies of originals 0..n_dup with 5-10% of words edited.
    let mut truth = Vec::new();
    for orig in 0..n_dup {
        let mut copy = docs[orig].clone();
        let rate = rng.random_range(0.05..=0.10);
        let mut budget = (rate * copy.len() as f64).round() as usize;
        while budget > 0 {
            let span = rng.random_range(1..=6usize).min(budget);
            budget -= span;
            let at = rng.random_range(0..copy.len().saturating_sub(span).max(1));
            match rng.random_range(0..3) {
                0 => {
                    for w in &mut copy[at..at + span] {
                        *w = sample(&mut rng);
                    }
                }
                1 => {
                    copy.drain(at..at + span);
                }
                _ => {
                    let ins: Vec<usize> = (0..span).map(|_| sample(&mut rng)).collect();
                    copy.splice(at..at, ins);
                }
            }
        }
        docs.push(copy);
        truth.push((orig, docs.len() - 1));
    }
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.shuffle(&mut rng);
    let mut pos = vec![0; docs.len()];
    for (new, &old) in order.iter().enumerate() {
        pos[old] = new;
    }
    let text: Vec<String> = order
        .iter()
        .map(|&i| {
            docs[i]
                .iter()
                .map(|&w| vocab[w].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let remap = |pairs: Vec<(usize, usize)>| -> Vec<(usize, usize)> {
        pairs
            .into_iter()
            .map(|(a, b)| (pos[a].min(pos[b]), pos[a].max(pos[b])))
            .collect()
    };
    Corpus {
        docs: text,
        truth: remap(truth),
        negatives: remap(negatives),
    }
}

fn shingles(text: &str) -> HashSet<&[u8]> {
    let w: Vec<&str> = text.split(' ').collect();
    w.windows(5)
        .map(|g| {
            let start = g[0].as_ptr() as usize - text.as_ptr() as usize;
            let end = g[4].as_ptr() as usize - text.as_ptr() as usize + g[4].len();
            &text.as_bytes()[start..end]
        })
        .collect()
}

fn jaccard(a: &str, b: &str) -> f64 {
    let (x, y) = (shingles(a), shingles(b));
    x.intersection(&y).count() as f64 / x.union(&y).count().max(1) as f64
}

fn main() {
    let a = args();
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .expect("thread pool");
    }
    let t0 = Instant::now();
    let corpus = generate(a.docs, a.seed);
    let bytes: usize = corpus.docs.iter().map(|d| d.len()).sum();
    println!(
        "corpus: {} docs, mean {:.0} bytes, {} planted near-duplicate pairs, {} hard-negative pairs (seed {}, generated in {:.1}s)",
        corpus.docs.len(),
        bytes as f64 / corpus.docs.len() as f64,
        corpus.truth.len(),
        corpus.negatives.len(),
        a.seed,
        t0.elapsed().as_secs_f64()
    );
    let mut js: Vec<f64> = corpus
        .truth
        .iter()
        .map(|&(x, y)| jaccard(&corpus.docs[x], &corpus.docs[y]))
        .collect();
    js.sort_by(|x, y| x.partial_cmp(y).unwrap());
    // What an ideal MinHash-LSH with 14 bands x 8 rows finds on these pairs.
    let expected_recall = js
        .iter()
        .map(|j| 1.0 - (1.0 - j.powi(8)).powi(14))
        .sum::<f64>()
        / js.len().max(1) as f64;
    let negs: f64 = corpus
        .negatives
        .iter()
        .take(2000)
        .map(|&(x, y)| jaccard(&corpus.docs[x], &corpus.docs[y]))
        .sum::<f64>()
        / corpus.negatives.len().clamp(1, 2000) as f64;
    println!(
        "planted pairs' true 5-gram Jaccard: min {:.2} p10 {:.2} median {:.2}; hard negatives mean {:.2}; \
         ideal (14 bands x 8 rows) recall on these pairs {:.4}",
        js[0],
        js[js.len() / 10],
        js[js.len() / 2],
        negs,
        expected_recall
    );

    if let Some(dir) = &a.out {
        fs::create_dir_all(dir).expect("create --out dir");
        let mut w =
            BufWriter::new(fs::File::create(dir.join("corpus.jsonl")).expect("corpus file"));
        for (i, d) in corpus.docs.iter().enumerate() {
            writeln!(w, "{}", serde_json::json!({"id": i, "text": d})).expect("write");
        }
        w.flush().expect("flush");
        let truth = serde_json::json!({"seed": a.seed, "pairs": corpus.truth});
        fs::write(dir.join("truth.json"), truth.to_string()).expect("truth file");
        println!("wrote {}/corpus.jsonl and truth.json", dir.display());
    }

    let start = Instant::now();
    let hasher = MinHasher::new(112, 5, a.hash_seed).expect("params");
    let sigs = hasher.signatures(&corpus.docs);
    let t_sig = start.elapsed().as_secs_f64();
    let mut lsh = Lsh::new(14, 8).expect("params");
    for (i, s) in sigs.iter().enumerate() {
        lsh.insert(i, s).expect("insert");
    }
    let clusters = lsh.clusters();
    let total = start.elapsed().as_secs_f64();

    let truth: HashSet<(usize, usize)> = corpus.truth.iter().copied().collect();
    let mut predicted = 0usize;
    let mut hits = 0usize;
    for c in &clusters {
        for (k, &x) in c.iter().enumerate() {
            for &y in &c[k + 1..] {
                predicted += 1;
                if truth.contains(&(x.min(y), x.max(y))) {
                    hits += 1;
                }
            }
        }
    }
    let recall = hits as f64 / truth.len().max(1) as f64;
    let precision = hits as f64 / predicted.max(1) as f64;
    println!(
        "rust: {} docs in {:.2}s (signatures {:.2}s) = {:.0} docs/s on {} threads; {} clusters, {} predicted pairs; recall {:.4} precision {:.4}",
        corpus.docs.len(),
        total,
        t_sig,
        corpus.docs.len() as f64 / total,
        rayon::current_num_threads(),
        clusters.len(),
        predicted,
        recall,
        precision
    );
    println!(
        "RESULT rust docs_per_s={:.1} recall={:.4} precision={:.4}",
        corpus.docs.len() as f64 / total,
        recall,
        precision
    );
}
