use std::path::PathBuf;

use hegraph::adapter::{self, BackendChoice, Method, TrainInput, TrainParams};
use hegraph::features::FeatureSet;
use hegraph::progress::CancelToken;

fn shared(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/features").join(name)
}

#[test]
fn explore_pets25() {
    let fs = FeatureSet::load(&shared("oxford_pets25.safetensors")).unwrap();
    let train = &fs.shots[&16];
    let test = fs.test.as_ref().unwrap();
    let input = TrainInput { classes: &fs.classes, text: fs.text.as_ref(), text_neg: None, train, val: fs.val.as_ref() };
    for m in [Method::ZeroShot, Method::TipAdapter, Method::TipAdapterF] {
        let t0 = std::time::Instant::now();
        let a = adapter::train(m, &TrainParams::default(), &input, BackendChoice::Cpu, &CancelToken::new(), &mut |_| {}).unwrap();
        println!("{m}: {:.2} (val {:?}) α {:?} β {:?} {:.0} ms", 100.0 * a.accuracy(test).unwrap(), a.val_accuracy, a.alpha, a.beta, t0.elapsed().as_secs_f64()*1e3);
    }
    for epochs in [10, 20, 40, 100] {
        let p = TrainParams { epochs, ..Default::default() };
        let t0 = std::time::Instant::now();
        let a = adapter::train(Method::HeGraph, &p, &input, BackendChoice::Cpu, &CancelToken::new(), &mut |_| {}).unwrap();
        println!("hegraph {epochs}: {:.2} val {:?} {:.0} ms loss {:?}..{:?}", 100.0 * a.accuracy(test).unwrap(), a.val_accuracy, t0.elapsed().as_secs_f64()*1e3, a.losses.first(), a.losses.last());
    }
}
