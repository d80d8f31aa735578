"""Policy validation: round trips, stable hashes and one-line errors naming file and key path."""

import textwrap
import warnings

import pydantic
import pytest
import yaml

import harden
from harden.policy import Policy
from harden.policy_io import checked, dump_policy, load_policy, policy_hash, validate_policy
from harden.testing import tiny_policy

MINIMAL = {"objectives": [{"name": "ce"}]}


def write(tmp_path, text, name="policy.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def policy_error(tmp_path, text):
    """Load ``text`` as a policy file; return (path, message) of the PolicyError it must raise."""
    path = write(tmp_path, text)
    with pytest.raises(harden.PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    return path, msg


# --------------------------------------------------------------------------- valid policies


def test_policy_error_is_a_value_error():
    assert issubclass(harden.PolicyError, ValueError)
    assert issubclass(harden.PolicyError, harden.HardenError)
    with pytest.raises(ValueError):
        validate_policy({"objectives": []})


def test_round_trip_through_yaml_is_equal():
    policy = tiny_policy(objectives=[{"name": "trades", "weight": 0.5}, {"name": "ce", "weight": 2}])
    again = validate_policy(yaml.safe_load(dump_policy(policy)))
    assert again == policy
    assert policy_hash(again) == policy_hash(policy)
    assert dump_policy(again) == dump_policy(policy)


def test_dump_fills_every_default():
    dumped = yaml.safe_load(dump_policy(validate_policy(MINIMAL)))
    assert dumped["threat"] == {"norm": "linf", "eps": 0.3, "rho": None}
    assert dumped["objectives"] == [
        {"name": "ce", "weight": 1.0, "params": {"label_smoothing": 0.0}}
    ]  # every: 1 left out
    assert set(dumped) == set(Policy.model_fields)


def test_load_policy_reads_a_file(tmp_path):
    path = write(
        tmp_path,
        """\
        name: demo
        seed: 7
        threat: {norm: l2, eps: 0.5}
        objectives:
          - name: pgd_at
            params: {steps: 3}
        """,
    )
    policy = load_policy(path)
    assert isinstance(policy, Policy)
    assert (policy.name, policy.seed) == ("demo", 7)
    assert (policy.threat.norm, policy.threat.eps) == ("l2", 0.5)
    assert policy.objectives[0].params["steps"] == 3
    assert policy.objectives[0].params["random_start"] is True  # default filled in
    assert load_policy(str(path)) == policy  # str paths too


def test_hash_ignores_comments_key_order_and_spelled_out_defaults(tmp_path):
    a = load_policy(
        write(
            tmp_path,
            """\
        seed: 3
        objectives:
          - {name: trades, params: {beta: 2}}
        threat: {eps: 0.1}
        """,
            "a.yaml",
        )
    )
    b = load_policy(
        write(
            tmp_path,
            """\
        # the same policy, written differently
        threat:
          eps: 0.1      # linf is the default norm
          norm: linf
        objectives:
          - params: {beta: 2.0, steps: 10}
            weight: 1.0
            name: trades
        seed: 3
        device: cpu
        """,
            "b.yaml",
        )
    )
    assert a == b
    assert policy_hash(a) == policy_hash(b)
    assert len(policy_hash(a)) == 64
    c = load_policy(
        write(tmp_path, "seed: 4\nobjectives: [{name: trades, params: {beta: 2}}]\nthreat: {eps: 0.1}\n", "c.yaml")
    )
    assert policy_hash(c) != policy_hash(a)


def test_fields_added_later_leave_the_hash_of_a_policy_that_does_not_use_them_as_it_was():
    """verify.sweep_steps and the targeted attacks' screen_steps / full_targets are left out of the dump at their
    defaults: the pinned hash is the one harden 0.1.0 gave this policy before those fields existed."""
    body = {
        "seed": 3,
        "objectives": [{"name": "ce"}],
        "threat": {"eps": 0.1},
        "verify": {"attacks": [{"name": "apgd_t", "params": {"steps": 5}}, {"name": "fab_t", "params": {"steps": 5}}]},
    }
    plain = validate_policy(body)
    assert policy_hash(plain) == "847b44b4185e345f8e73794f345bc425905e335d4885d1d1434d6b05290911fb"
    dumped = plain.model_dump(mode="json")["verify"]
    assert "sweep_steps" not in dumped and plain.verify.sweep_steps == 10
    assert all("screen_steps" not in a["params"] and "full_targets" not in a["params"] for a in dumped["attacks"])
    spelled = {"screen_steps": None, "full_targets": 1, "steps": 5}  # the defaults written out
    attacks = [{"name": "apgd_t", "params": spelled}, {"name": "fab_t", "params": spelled}]
    same = validate_policy({**body, "verify": {"attacks": attacks, "sweep_steps": 10}})
    assert policy_hash(same) == policy_hash(plain)
    screened = [{"name": "apgd_t", "params": {**spelled, "screen_steps": 2}}, attacks[1]]
    assert policy_hash(validate_policy({**body, "verify": {"attacks": screened}})) != policy_hash(plain)
    assert plain.checked and checked(plain) is plain  # the stored params still say what the checked ones say
    assert all(type(a.params_for_build()).__name__ in {"APGDTParams", "FABParams"} for a in plain.verify.attacks)
    used = validate_policy({**body, "verify": {**body["verify"], "sweep_steps": 5}})
    assert used.model_dump(mode="json")["verify"]["sweep_steps"] == 5 and policy_hash(used) != policy_hash(plain)


def test_hash_is_stable_across_calls():
    p = tiny_policy()
    assert policy_hash(p) == policy_hash(tiny_policy()) == policy_hash(p)


def test_policies_are_frozen():
    policy = validate_policy(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        policy.seed = 5
    with pytest.raises(pydantic.ValidationError):
        policy.train.epochs = 9
    with pytest.raises(pydantic.ValidationError):
        policy.threat.eps = 0.5
    assert policy.seed == 0 and policy.train.epochs == 3 and policy.threat.eps == 0.3
    with pytest.raises(TypeError):
        policy.objectives[0] = policy.objectives[0]  # a tuple


def test_l2_allows_eps_above_one():
    assert validate_policy({**MINIMAL, "threat": {"norm": "l2", "eps": 2.0}}).threat.eps == 2.0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "key_path", "detail"),
    [
        ("objectives: [{name: ce}]\nbogus: 1\n", "bogus", "unknown key"),
        ("objectives: [{name: ce}]\ntrain: {epocs: 2}\n", "train.epocs", "unknown key"),
        ("objectives: [{name: ce}]\ntrain: {epochs: many}\n", "train.epochs", "expected an integer, got 'many'"),
        ("objectives: [{name: ce}]\nthreat: {eps: -0.1}\n", "threat.eps", "expected a number > 0"),
        ("objectives: [{name: ce}]\nthreat: {eps: 1.5}\n", "threat.eps", "expected eps <= 1"),
        ("objectives: [{name: ce}]\ntrain: {epochs: 0}\n", "train.epochs", "expected a number >= 1, got 0"),
        ("objectives: [{name: ce, weight: -1}]\n", "objectives.0.weight", "expected a number >= 0"),
        ("objectives: [{name: ce}, {name: pgd-at}]\n", "objectives.1.name", "did you mean 'pgd_at'?"),
        ("objectives: [{name: ce, every: 0}]\n", "objectives.0.every", "expected a number >= 1, got 0"),
        ("objectives: [{name: ce, every: 2}]\n", "objectives", "computed on every step"),
        (
            "objectives: [{name: ce}]\nverify: {attacks: [{name: pgdd}]}\n",
            "verify.attacks.0.name",
            "did you mean 'pgd'",
        ),
        ("objectives: [{name: pgd_at, params: {stepz: 3}}]\n", "objectives.0.params.stepz", "unknown key"),
        ("objectives: [{name: trades, params: {beta: -1}}]\n", "objectives.0.params.beta", "expected a number >= 0"),
        (
            "objectives: [{name: ce}]\nverify: {attacks: [{name: pgd, params: {steps: 0}}]}\n",
            "verify.attacks.0.params.steps",
            "expected a number >= 1",
        ),
        ("objectives: [{name: ce}]\nmodel: {name: 'timm:resnet10x'}\n", "model.name", "did you mean 'resnet10t'"),
        ("objectives: [{name: ce}]\ndata: {name: mnist5k}\n", "data.name", "did you mean 'mnist-5k'?"),
        ("objectives: [{name: ce, weight: 0}, {name: trades, weight: 0}]\n", "objectives", "weight > 0"),
        ("objectives: [{name: ce}]\nverify: {sweep_steps: 0}\n", "verify.sweep_steps", "expected a number >= 1, got 0"),
        ("objectives: []\n", "objectives", "at least 1 item"),
        ("seed: 1\n", "objectives", "required key"),
    ],
)
def test_errors_name_the_file_and_the_key_path(tmp_path, body, key_path, detail):
    _, msg = policy_error(tmp_path, body)
    assert f": {key_path}: " in msg
    assert detail in msg


def test_param_errors_name_the_objective(tmp_path):
    _, msg = policy_error(tmp_path, "objectives: [{name: ce}, {name: trades, params: {beta: -1}}]\n")
    assert ": objectives.1.params.beta: " in msg
    assert "'trades'" in msg
    assert "-1" in msg


def test_odd_param_keys_are_quoted_on_one_line(tmp_path):
    # found by the fuzz test: a newline key inside attack params broke the one-line message
    _, msg = policy_error(tmp_path, 'objectives: [{name: ce}]\nverify: {attacks: [{name: pgd, params: {"\\n": 1}}]}\n')
    assert "\n" not in msg
    assert ": verify.attacks.0.params.'\\n': unknown key" in msg
    assert "'pgd'" in msg


def test_unknown_params_suggest_the_close_ones(tmp_path):
    _, msg = policy_error(tmp_path, "objectives: [{name: pgd_at, params: {step: 5}}]\n")
    assert ": objectives.0.params.step: unknown key" in msg
    assert "did you mean 'steps', 'step_size'?" in msg
    _, msg = policy_error(tmp_path, "objectives: [{name: pgd_at, params: {zzz: 5}}]\n")
    assert "expected one of steps, step_size, random_start" in msg


def test_unknown_objective_lists_suggestions(tmp_path):
    _, msg = policy_error(tmp_path, "objectives: [{name: pgd-at}]\n")
    assert "got 'pgd-at'" in msg
    assert "'pgd_at'" in msg


def test_yaml_syntax_error_gives_the_line(tmp_path):
    _, msg = policy_error(tmp_path, "seed: 1\nobjectives:\n  - name: ce\n    weight: 1: 2\n")
    assert "expected valid YAML" in msg
    assert "(line 4," in msg


@pytest.mark.parametrize(
    "body",
    [
        "base: &b {name: ce}\nobjectives: [*b]\n",  # anchor and alias
        "objectives: &objs [{name: ce}]\n",  # an anchor alone is refused too
    ],
)
def test_yaml_anchors_and_aliases_are_refused(tmp_path, body):
    _, msg = policy_error(tmp_path, body)
    assert "anchors and aliases are not allowed" in msg
    assert "(line 1," in msg


def test_yaml_duplicate_keys_are_refused(tmp_path):
    _, msg = policy_error(tmp_path, "seed: 1\nobjectives: [{name: ce}]\nseed: 2\n")
    assert "expected unique keys, got 'seed' twice" in msg
    assert "(line 3," in msg


def test_yaml_python_tags_are_refused(tmp_path):
    _, msg = policy_error(tmp_path, "objectives: !!python/object/apply:os.getcwd []\n")
    assert "expected valid YAML" in msg


@pytest.mark.parametrize(("body", "got"), [("- 1\n- 2\n", "list"), ("just text\n", "str"), ("", "NoneType")])
def test_top_level_must_be_a_mapping(tmp_path, body, got):
    _, msg = policy_error(tmp_path, body)
    assert msg.endswith(f"(top level): expected a mapping of policy keys, got {got}")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(harden.PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: expected a readable policy file")


def test_undecodable_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00objectives")
    with pytest.raises(harden.PolicyError, match="UTF-8"):
        load_policy(path)


def test_validate_policy_without_source_has_no_file_prefix():
    with pytest.raises(harden.PolicyError) as info:
        validate_policy({"objectives": [{"name": "ce"}], "threat": {"eps": 0}})
    assert str(info.value).startswith("threat.eps: ")


def test_more_errors_are_counted(tmp_path):
    _, msg = policy_error(tmp_path, "objectives: [{name: ce}]\nbogus: 1\nseed: -1\n")
    assert "(and 1 more)" in msg


def test_a_lazy_first_objective_warns_about_batchnorm_statistics():
    objectives = [{"name": "pgd_at", "every": 2}, {"name": "ce"}]
    with pytest.warns(UserWarning, match="BatchNorm's running statistics"):
        tiny_policy(objectives=objectives)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_policy(objectives=objectives, train={"bn_stats": "every_forward"})
        tiny_policy(objectives=objectives[::-1])


# --------------------------------------------------------------------------- strict values, names, timm args


@pytest.mark.parametrize(
    ("body", "key_path", "detail"),
    [
        ("threat: {eps: true}\n", "threat.eps", "expected a number, got True"),  # not 1.0
        ("threat: {eps: '0.1'}\n", "threat.eps", "expected a number, got '0.1'"),
        ("verify: {checks: 1}\n", "verify.checks", "expected true or false, got 1"),
        ("train: {epochs: true}\n", "train.epochs", "expected an integer, got True"),
        ("train: {milestones: [1, true]}\n", "train.milestones.1", "expected an integer, got True"),
        ("model: {mean: [0.5, '0.5'], std: [1, 1]}\n", "model.mean.1", "expected a number, got '0.5'"),
        (
            "objectives: [{name: pgd_at, params: {random_start: 1}}]\n",
            "objectives.0.params.random_start",
            "true or false",
        ),
        ("objectives: [{name: trades, params: {beta: false}}]\n", "objectives.0.params.beta", "expected a number"),
        ("verify: {attacks: [{name: pgd, params: {steps: '40'}}]}\n", "verify.attacks.0.params.steps", "an integer"),
    ],
)
def test_values_are_strict(tmp_path, body, key_path, detail):
    _, msg = policy_error(tmp_path, "objectives: [{name: ce}]\n" + body if "objectives" not in body else body)
    assert f": {key_path}: " in msg
    assert detail in msg


def test_integers_stay_fine_where_floats_are_expected(tmp_path):
    policy = load_policy(
        write(tmp_path, "objectives: [{name: trades, params: {beta: 2}}]\nthreat: {eps: 1}\ntrain: {lr: 1}\n")
    )
    assert policy.threat.eps == 1.0 and isinstance(policy.threat.eps, float)
    assert policy.train.lr == 1.0 and policy.objectives[0].params["beta"] == 2.0


@pytest.mark.parametrize(
    "name", ["..", ".", "", "a/b", "a\\b", "a\x00b", "-rf", ".hidden", "ends.", "con", "NUL.txt", "a b"]
)
def test_the_name_is_one_safe_folder_name(name):
    with pytest.raises(harden.PolicyError, match=r"^name: ") as info:
        validate_policy({**MINIMAL, "name": name})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["demo", "mnist-pgd", "v1.2", "_x", "a-", "console", "über"])
def test_ordinary_names_are_fine(name):
    assert validate_policy({**MINIMAL, "name": name}).name == name


def test_a_bad_name_says_what_to_do(tmp_path):
    _, msg = policy_error(tmp_path, "name: '..'\nobjectives: [{name: ce}]\n")
    assert ": name: expected one safe folder name" in msg and "got '..'" in msg and msg.endswith("name: my-policy")


@pytest.mark.parametrize(
    "key",
    ["pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path", "cache_dir"],
)
def test_timm_args_cannot_load_files(tmp_path, key):
    value = "true" if key in ("pretrained", "pretrained_strict") else "/tmp/x"
    _, msg = policy_error(
        tmp_path, f"objectives: [{{name: ce}}]\nmodel: {{name: 'timm:resnet10t', args: {{{key}: {value}}}}}\n"
    )
    assert f": model.args.{key}: expected no timm argument that reads or downloads" in msg
    assert "model.pretrained_file" in msg


def test_timm_args_that_load_nothing_and_factory_args_are_fine():
    timm_model = validate_policy({**MINIMAL, "model": {"name": "timm:resnet10t", "args": {"drop_rate": 0.1}}}).model
    assert timm_model.args == {"drop_rate": 0.1}
    own = validate_policy({**MINIMAL, "model": {"name": "harden.testing:TinyCNN", "args": {"pretrained": True}}}).model
    assert own.args == {"pretrained": True}  # the user's own factory decides what its args mean


def test_an_eps_below_half_a_pixel_level_warns():
    with pytest.warns(UserWarning, match=r"threat.eps 1e-300 is below half a pixel level \(0.5/255") as record:
        policy = validate_policy({**MINIMAL, "threat": {"eps": 1e-300}})
    assert policy.threat.below_half_level and len(record) == 1
    with pytest.warns(UserWarning, match="below half a pixel level"):
        validate_policy({**MINIMAL, "threat": {"norm": "l2", "eps": 0.001}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_policy({**MINIMAL, "threat": {"eps": 1 / 255}})
        validate_policy({**MINIMAL, "threat": {"eps": 0.5 / 255}})
