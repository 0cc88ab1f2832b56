//! The `Policy` trait's provided `sequence_logps` (masked sum of `token_logps`).
use align_algorithms::{Policy, Result, TokenBatch};
use candle_core::{DType, Device, Tensor, Var};

struct Fixed(Var);
impl Policy for Fixed {
    fn token_logps(&self, _batch: &TokenBatch, adapters: bool) -> Result<Tensor> {
        Ok(if adapters {
            self.0.as_tensor().clone()
        } else {
            self.0.as_tensor().detach()
        })
    }
    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![("lp".into(), self.0.clone())]
    }
}

#[test]
fn sequence_logps_is_masked_sum() {
    let dev = Device::Cpu;
    let lp = Var::from_tensor(
        &Tensor::new(&[[-1.0f64, -2.0, -3.0], [-0.5, -0.25, -4.0]], &dev).unwrap(),
    )
    .unwrap();
    let p = Fixed(lp.clone());
    let batch = TokenBatch {
        input_ids_B_L: Tensor::zeros((2, 3), DType::U32, &dev).unwrap(),
        attention_mask_B_L: Tensor::ones((2, 3), DType::U32, &dev).unwrap(),
        completion_mask_B_L: Tensor::new(&[[0u32, 1, 1], [0, 1, 0]], &dev).unwrap(),
    };
    let s = p.sequence_logps(&batch, true).unwrap();
    assert_eq!(s.to_vec1::<f64>().unwrap(), vec![-5.0, -0.25]);
    let g = s.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        g.get(&lp).unwrap().to_vec2::<f64>().unwrap(),
        vec![vec![0.0, 1.0, 1.0], vec![0.0, 1.0, 0.0]]
    );
    assert_eq!(p.trainable_vars().len(), 1);
}
