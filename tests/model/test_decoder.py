"""tinylab/model/decoder.py: the language decoder is transformers' answer where it is a module of the
model holding others, else the whole model."""

from testkit import arch_model

from tinylab.model.decoder import language_decoder


def test_the_language_decoder_is_get_decoders_answer_unless_that_is_a_single_map():
    llama, _ = arch_model("llama")
    assert language_decoder(llama) == ("model", llama.model)
    gpt2, _ = arch_model("gpt2")
    assert language_decoder(gpt2) == ("transformer", gpt2.transformer)
    modernbert, _ = arch_model("modernbert_decoder")  # get_decoder() answers its LM head, a Linear
    assert type(modernbert.get_decoder()).__name__ == "Linear"
    assert language_decoder(modernbert) == ("", modernbert)

    class NoAnswer(type(llama)):
        def get_decoder(self):
            raise NotImplementedError

    llama.__class__ = NoAnswer
    assert language_decoder(llama) == ("", llama)
