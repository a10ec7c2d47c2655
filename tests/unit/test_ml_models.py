import itertools

import pytest
import torch

from workers.ml.cnn import CNNConfig, ImageCNN
from workers.ml.models import build_model, config_dict
from workers.ml.rnn import RNNConfig, SequenceRNN

# Tiny models: one thread is faster than two contended ones on a shared CI box.
torch.set_num_threads(1)


def _assert_all_grads(model, loss):
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("cfg", [
    CNNConfig(in_channels=1, image_size=(28, 28), num_outputs=10),
    CNNConfig(in_channels=3, image_size=(64, 48), num_outputs=4, channels=(8, 16, 32), batch_norm=False),
    CNNConfig(in_channels=1, image_size=(1, 5), num_outputs=2, channels=(4, 4, 4), pool_to=2),
])
def test_cnn_shapes_and_gradients(cfg):
    torch.manual_seed(0)
    model = ImageCNN(cfg)
    x = torch.randn(4, cfg.in_channels, *cfg.image_size)
    out = model(x)
    assert out.shape == (4, cfg.num_outputs)
    _assert_all_grads(model, out.pow(2).sum())


def test_cnn_applies_each_conv_once():
    model = ImageCNN(CNNConfig(in_channels=1, image_size=(28, 28), channels=(32, 64)))
    calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: calls.append(mod))
    model(torch.randn(2, 1, 28, 28))
    assert len(calls) == 2 and len(set(map(id, calls))) == 2


def _rnn(cell, bidirectional, layers, vocab=20):
    torch.manual_seed(0)
    return SequenceRNN(RNNConfig(vocab_size=vocab, num_outputs=3, cell=cell, embedding_dim=8, hidden_size=12,
                                 num_layers=layers, bidirectional=bidirectional, dropout=0.0))


CELLS = list(itertools.product(["rnn", "gru", "lstm"], [False, True], [1, 2]))


@pytest.mark.parametrize("cell,bidirectional,layers", CELLS)
def test_rnn_shapes_and_gradients(cell, bidirectional, layers):
    model = _rnn(cell, bidirectional, layers)
    ids = torch.randint(1, 20, (5, 9))
    lengths = torch.tensor([9, 4, 1, 7, 2])
    out = model(ids, lengths)
    assert out.shape == (5, 3)
    _assert_all_grads(model, out.pow(2).sum())


@pytest.mark.parametrize("cell,bidirectional,layers", CELLS)
def test_rnn_prediction_ignores_padding(cell, bidirectional, layers):
    model = _rnn(cell, bidirectional, layers).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 2, 5, 1])
    ids = torch.randint(1, 20, (4, 6), generator=g)
    ids[torch.arange(6) >= lengths[:, None]] = 0
    with torch.no_grad():
        base = model(ids, lengths)
        # More padding appended to the batch.
        padded = torch.cat([ids, torch.zeros(4, 11, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model(padded, lengths), base, rtol=0, atol=1e-6)
        # Garbage after each sequence's end is never read either.
        noisy = padded.clone()
        mask = torch.arange(17) >= lengths[:, None]
        noisy[mask] = torch.randint(1, 20, (int(mask.sum()),), generator=g)
        torch.testing.assert_close(model(noisy, lengths), base, rtol=0, atol=1e-6)
        # Each sequence alone, unpadded, gives the same answer as inside the batch.
        for i, n in enumerate(lengths.tolist()):
            alone = model(ids[i:i + 1, :n], lengths[i:i + 1])
            torch.testing.assert_close(alone, base[i:i + 1], rtol=0, atol=1e-5)


def test_build_model_from_json_params():
    model = build_model("cnn", {"in_channels": 3, "image_size": [32, 32], "num_outputs": 2, "channels": [8]})
    assert isinstance(model, ImageCNN) and model.cfg.image_size == (32, 32)
    assert config_dict(model)["channels"] == [8]
    with pytest.raises(ValueError, match="unknown rnn parameters"):
        build_model("rnn", {"vocab_size": 10, "hiden_size": 3})
    with pytest.raises(ValueError):
        build_model("rnn", {"vocab_size": 10, "cell": "transformer"})
