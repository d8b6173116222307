//! The HeGraphAdapter training step on wgpu against the CPU reference (candle autodiff): loss and gradients of
//! one step on awkward shapes, with and without negative nodes, and whole trainings from the same seed.
//! Runs on lavapipe in CI; fails with a clear message when no adapter exists, unless
//! `HEGRAPH_SKIP_GPU_TESTS=1`.

use std::sync::Arc;

use hegraph::adapter::hegraph::{loss_and_grads, HeGraphHyper, HeGraphState};
use hegraph::adapter::{
    self, stack_queries, BackendChoice, BackendFactory, Method, TrainInput, TrainParams,
};
use hegraph::features::LabelledSplit;
use hegraph::gpu::{GpuContext, GpuHeGraphFactory, GpuOptions};
use hegraph::graph::{GraphOptions, HeteroGraph, LabelledViewsRef};
use hegraph::linalg::Mat;
use hegraph::progress::CancelToken;
use hegraph::rng::Rng;

fn factory() -> Option<GpuHeGraphFactory> {
    match GpuContext::new_headless(&GpuOptions::default()) {
        Ok(ctx) => {
            eprintln!("adapter: {}", ctx.describe());
            Some(GpuHeGraphFactory::new(Arc::new(ctx)).expect("kernels build"))
        }
        Err(e) if std::env::var("HEGRAPH_SKIP_GPU_TESTS").is_ok_and(|v| v == "1") => {
            eprintln!("skipped: no GPU adapter ({e}) and HEGRAPH_SKIP_GPU_TESTS=1");
            None
        }
        Err(e) => panic!(
            "no GPU adapter: {e} (install mesa-vulkan-drivers, or set HEGRAPH_SKIP_GPU_TESTS=1)"
        ),
    }
}

/// Max |a − b| over max(1e-3, max |b|): the error relative to the tensor's scale.
fn rel_err(a: &Mat, b: &Mat) -> f32 {
    let scale = b.data.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-3);
    a.max_abs_diff(b) / scale
}

/// A few-shot task with weak class structure (image = `signal`·centre + noise), so neither softmax
/// saturates and every gradient is far from zero.
fn random_task(
    c: usize,
    k: usize,
    d: usize,
    views: usize,
    signal: f32,
    seed: u64,
) -> hegraph::adapter::bench::SyntheticTask {
    let mut rng = Rng::new(seed);
    let unit = |rng: &mut Rng, base: Option<&[f32]>, w: f32| {
        let mut v = rng.normal_vec(d);
        if let Some(b) = base {
            v.iter_mut()
                .zip(b)
                .for_each(|(x, b)| *x = *x / (d as f32).sqrt() + w * b);
        }
        hegraph::linalg::normalize(&mut v);
        v
    };
    let centres: Vec<Vec<f32>> = (0..c).map(|_| unit(&mut rng, None, 0.0)).collect();
    let text = Mat::from_rows(
        &centres
            .iter()
            .map(|m| unit(&mut rng, Some(m), signal))
            .collect::<Vec<_>>(),
        d,
    );
    let text_neg = Mat::from_rows(
        &(0..c)
            .map(|_| unit(&mut rng, None, 0.0))
            .collect::<Vec<_>>(),
        d,
    );
    let m = c * k;
    let labels: Vec<usize> = (0..m).map(|i| i / k).collect();
    let feats: Vec<Vec<f32>> = labels
        .iter()
        .map(|&l| unit(&mut rng, Some(&centres[l]), signal))
        .collect();
    let view_mats = (0..views)
        .map(|_| {
            Mat::from_rows(
                &feats
                    .iter()
                    .map(|f| unit(&mut rng, Some(f), 1.0))
                    .collect::<Vec<_>>(),
                d,
            )
        })
        .collect();
    hegraph::adapter::bench::SyntheticTask {
        classes: (0..c).map(|i| format!("class {i}")).collect(),
        text,
        text_neg,
        train: LabelledSplit {
            features: Mat::from_rows(&feats, d),
            labels,
            views: Some(view_mats),
            paths: None,
        },
    }
}

fn graph_of(
    classes: &[String],
    text: &Mat,
    neg: Option<&Mat>,
    split: &LabelledSplit,
) -> HeteroGraph {
    HeteroGraph::build(
        classes,
        text,
        neg,
        &LabelledViewsRef::from_split(split),
        &GraphOptions::default(),
    )
    .expect("graph builds")
}

#[test]
fn one_step_loss_and_gradients_match_the_cpu_reference() {
    let Some(f) = factory() else { return };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("seed {seed}");
    // (classes, shots, dim, views, with negatives, a class left without labelled images)
    let shapes = [
        (1, 1, 7, 1, true, false),
        (7, 7, 7, 2, true, false),
        (17, 1, 16, 3, false, false),
        (13, 5, 33, 2, true, false),
        (9, 3, 64, 1, false, false),
        (6, 3, 16, 2, true, true),
    ];
    for (i, &(c, k, d, views, neg, empty)) in shapes.iter().enumerate() {
        let mut task = random_task(c, k, d, views, 0.3, seed.wrapping_add(i as u64));
        if empty {
            // Class 2 keeps its text nodes but has no cache entries: an empty class segment.
            let keep: Vec<usize> = (0..task.train.labels.len())
                .filter(|&j| task.train.labels[j] != 2)
                .collect();
            let t = &task.train;
            task.train = hegraph::features::LabelledSplit {
                features: t.features.select_rows(&keep),
                labels: keep.iter().map(|&j| t.labels[j]).collect(),
                views: t
                    .views
                    .as_ref()
                    .map(|v| v.iter().map(|m| m.select_rows(&keep)).collect()),
                paths: None,
            };
        }
        let graph = graph_of(
            &task.classes,
            &task.text,
            neg.then_some(&task.text_neg),
            &task.train,
        );
        let params = TrainParams {
            seed: seed ^ i as u64,
            ..TrainParams::spec()
        };
        let (queries, _) = stack_queries(&task.train);
        let m = task.train.labels.len();
        // A batch drawing different views of the images, in a shuffled order, with a repeat.
        let mut rng = Rng::new(seed ^ 0xABC ^ i as u64);
        let mut rows: Vec<u32> = (0..m)
            .map(|img| (rng.below(views) * m + img) as u32)
            .collect();
        rng.shuffle(&mut rows);
        rows.push(rows[0]);
        let labels: Vec<u32> = rows
            .iter()
            .map(|&r| task.train.labels[r as usize % m] as u32)
            .collect();
        let z = queries.select_rows(&rows.iter().map(|&r| r as usize).collect::<Vec<_>>());
        let label_usize: Vec<usize> = labels.iter().map(|&l| l as usize).collect();

        let state = HeGraphState::init(d, neg, params.seed);
        let want = loss_and_grads(
            &graph,
            &HeGraphHyper::train(&params),
            &state.weights(),
            &z,
            &label_usize,
        )
        .expect("reference gradients");

        let mut gpu = f
            .create(&graph, &queries, &params, state.clone())
            .expect("gpu backend");
        let loss = gpu
            .step(&rows, &labels, params.lr, true)
            .expect("gpu step")
            .expect("loss asked for");
        let after = gpu.state().expect("gpu state");
        // After the first AdamW step, m = (1 − β1)·g exactly: the gradient, read back without extra plumbing.
        let grad = |pm: &Mat| {
            let mut g = pm.clone();
            g.data
                .iter_mut()
                .for_each(|x| *x /= 1.0 - params.adam_betas.0);
            g
        };
        let shape = format!("C={c} K={k} D={d} A={views} negatives={neg} empty class={empty}");
        let le = (loss as f64 - want.loss).abs() / want.loss.abs().max(1e-3);
        assert!(le <= 1e-4, "{shape}: loss {loss} vs {}", want.loss);
        let ep = rel_err(&grad(&after.p.m), &want.w_p);
        let ev = rel_err(&grad(&after.v.m), &want.w_v);
        assert!(ep <= 1e-4, "{shape}: dW_P relative error {ep}");
        assert!(ev <= 1e-4, "{shape}: dW_V relative error {ev}");
        if neg {
            let en = rel_err(
                &grad(&after.n.as_ref().expect("W_N state").m),
                want.w_n.as_ref().expect("W_N gradient"),
            );
            assert!(en <= 1e-4, "{shape}: dW_N relative error {en}");
        }
        assert_eq!(after.step, 1);
        let scale = |m: &Mat| m.data.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        eprintln!(
            "{shape}: loss {loss:.6}, gradient errors P {ep:.2e} V {ev:.2e} (max |dW_P| {:.2e}, |dW_V| {:.2e})",
            scale(&want.w_p),
            scale(&want.w_v)
        );
    }
}

#[test]
fn the_same_seed_trains_to_the_same_accuracy_on_both_backends() {
    let Some(f) = factory() else { return };
    let (c, k, test_k, d, views) = (12, 4, 20, 24, 2);
    let task = random_task(c, k + test_k, d, views, 0.35, 5);
    let pick = |range: std::ops::Range<usize>| -> Vec<usize> {
        (0..c)
            .flat_map(|cls| range.clone().map(move |j| cls * (k + test_k) + j))
            .collect()
    };
    let tr = pick(0..k);
    let te = pick(k..k + test_k);
    let train = LabelledSplit {
        features: task.train.features.select_rows(&tr),
        labels: tr.iter().map(|&i| task.train.labels[i]).collect(),
        views: task
            .train
            .views
            .as_ref()
            .map(|vs| vs.iter().map(|v| v.select_rows(&tr)).collect()),
        paths: None,
    };
    let test = LabelledSplit {
        features: task.train.features.select_rows(&te),
        labels: te.iter().map(|&i| task.train.labels[i]).collect(),
        views: None,
        paths: None,
    };
    let params = TrainParams {
        epochs: 10,
        batch_size: 16,
        ..TrainParams::spec()
    };
    let input = TrainInput {
        classes: &task.classes,
        text: Some(&task.text),
        text_neg: Some(&task.text_neg),
        train: &train,
        val: None,
    };
    let run = |choice: BackendChoice| {
        let a = adapter::train(
            Method::HeGraph,
            &params,
            &input,
            choice,
            &CancelToken::new(),
            &mut |_| {},
        )
        .expect("training");
        100.0 * a.accuracy(&test).expect("accuracy")
    };
    let cpu = run(BackendChoice::Cpu);
    let gpu = run(BackendChoice::Custom(&f));
    eprintln!("test accuracy: CPU {cpu:.2}%, wgpu {gpu:.2}%");
    assert!((cpu - gpu).abs() <= 0.5, "CPU {cpu}% vs wgpu {gpu}%");
}

/// Destroys its device before step `lose_at`, as a driver reset or an unplugged eGPU would.
struct LosingFactory {
    inner: GpuHeGraphFactory,
    lose_at: usize,
}

struct Losing {
    inner: Box<dyn hegraph::adapter::HeGraphBackend>,
    ctx: GpuContext,
    steps: usize,
    lose_at: usize,
}

impl BackendFactory for LosingFactory {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn create(
        &self,
        graph: &HeteroGraph,
        queries: &Mat,
        params: &TrainParams,
        state: HeGraphState,
    ) -> Result<Box<dyn hegraph::adapter::HeGraphBackend>, hegraph::adapter::AdapterError> {
        Ok(Box::new(Losing {
            inner: self.inner.create(graph, queries, params, state)?,
            ctx: self.inner.kernels().context().clone(),
            steps: 0,
            lose_at: self.lose_at,
        }))
    }
}

impl hegraph::adapter::HeGraphBackend for Losing {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn step(
        &mut self,
        rows: &[u32],
        labels: &[u32],
        lr: f32,
        want_loss: bool,
    ) -> Result<Option<f32>, hegraph::adapter::AdapterError> {
        self.steps += 1;
        if self.steps == self.lose_at {
            self.ctx.device.destroy();
        }
        self.inner.step(rows, labels, lr, want_loss)
    }

    fn state(&mut self) -> Result<HeGraphState, hegraph::adapter::AdapterError> {
        self.inner.state()
    }
}

#[test]
fn a_gpu_lost_mid_training_hands_over_to_the_cpu_from_the_last_snapshot() {
    let Some(f) = factory() else { return };
    let losing = LosingFactory {
        inner: f,
        lose_at: 7,
    };
    let task = random_task(8, 4, 16, 2, 0.4, 11);
    let params = TrainParams {
        epochs: 6,
        batch_size: 8,
        snapshot_every: 3,
        ..TrainParams::spec()
    };
    let input = task.input();
    let mut messages = Vec::new();
    let mut last_step = 0;
    let trained = adapter::train(
        Method::HeGraph,
        &params,
        &input,
        BackendChoice::Custom(&losing),
        &CancelToken::new(),
        &mut |ev| match ev {
            hegraph::adapter::TrainEvent::Message(m) => messages.push(m.clone()),
            hegraph::adapter::TrainEvent::Step { step, total, .. } => {
                last_step = *step;
                assert!(step <= total);
            }
        },
    )
    .expect("training survives the lost device");
    eprintln!("{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("device lost") && m.contains("CPU")),
        "{messages:?}"
    );
    assert!(trained.notes.iter().any(|n| n.contains("device lost")));
    let cpu = adapter::train(
        Method::HeGraph,
        &params,
        &input,
        BackendChoice::Cpu,
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("CPU training");
    let probe = &task.train;
    let (a, b) = (
        100.0 * trained.accuracy(probe).expect("accuracy"),
        100.0 * cpu.accuracy(probe).expect("accuracy"),
    );
    eprintln!("after hand-over {a:.2}%, CPU only {b:.2}%");
    assert!((a - b).abs() <= 0.5, "{a} vs {b}");
}

/// `auto` trains on wgpu exactly when the adapter is a real GPU (decided from the adapter's type, before a
/// device is opened), and the explicit requests get what they name.
#[test]
fn backend_requests_pick_what_they_name() {
    use hegraph::gpu::{select_backend, BackendRequest, ComputeBackend};
    let Some(_f) = factory() else { return };
    let info = GpuContext::probe_headless(&GpuOptions::default()).expect("the adapter probed");
    let auto = select_backend(BackendRequest::Auto).expect("auto");
    let software = info.device_type == wgpu::DeviceType::Cpu;
    assert_eq!(auto.is_gpu(), !software, "{}", auto.describe());
    if software {
        assert!(auto.describe().contains("software"), "{}", auto.describe());
    }
    let cpu = select_backend(BackendRequest::Cpu).expect("cpu");
    assert!(matches!(cpu, ComputeBackend::Cpu { reason: None }));
    let candle = select_backend("candle".parse().expect("parses")).expect("candle");
    assert!(
        matches!(candle, ComputeBackend::Candle(_)),
        "{}",
        candle.describe()
    );
    assert!(select_backend(BackendRequest::Wgpu).expect("wgpu").is_gpu());
    assert!("cuda".parse::<BackendRequest>().is_err());
}
