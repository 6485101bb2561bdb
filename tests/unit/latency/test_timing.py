"""The token lengths a profiling feed takes (``upop.latency.timing``): a decode step's mask covers its past and the new
token, and a row says at which lengths it ran and, for a decode step, its tokens per second."""

from upop.latency.timing import feed_shape, make_run, token_axes

STEP = [{"name": "inputs_embeds", "shape": ["batch", 1, 32]}, {"name": "attention_mask", "shape": ["batch", "total"]},
        {"name": "past_key_0", "shape": ["batch", 2, "past", 8]}]


def test_a_decode_step_feed_has_its_mask_one_longer_than_its_past():
    shapes = {i["name"]: feed_shape(i["shape"], 3, 20) for i in STEP}
    assert shapes == {"inputs_embeds": [3, 1, 32], "attention_mask": [3, 21], "past_key_0": [3, 2, 20, 8]}
    assert feed_shape(["batch", "sequence"], 2, 20) == [2, 20]


def test_rows_state_the_token_lengths_and_a_decode_step_s_tokens_per_second():
    assert token_axes(STEP, 64) == ("past 64", True)
    assert token_axes([{"name": "input_ids", "shape": ["batch", "sequence"]}], 64) == ("sequence 64", False)
    step = make_run("t", "onnxruntime", "cpu", "fp32", "decoder_step", 4, [10.0, 10.0, 10.0], inputs=STEP, seq=64)
    assert step.tokens == "past 64" and step.tokens_per_s == step.throughput == 400.0
    image = make_run("t", "onnxruntime", "cpu", "fp32", "vision_encoder", 4, [10.0],
                     inputs=[{"name": "pixel_values", "shape": ["batch", 3, 16, 16]}])
    assert image.tokens == "" and image.tokens_per_s is None
