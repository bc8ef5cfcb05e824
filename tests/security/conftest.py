"""The security regression suite: one test per attack, each on a real mosquitto.

What runs here
    Every test starts from a fleet.yaml with identities (two devices, a host and a
    monitor), the CA and client certificates 'slimfleet certs' makes, and the ACL,
    password files and mosquitto.conf 'slimfleet acl' writes (see tests/securefleet.py).
    mosquitto runs exactly those files: mutual TLS on the device listener (client id
    forced to the certificate's name), password plus certificate on the host listener.

How a test reads
    The attacker is a real MQTT client holding one identity's credentials (or none).
    Each test does the attack, then checks the effect did not happen, next to a
    positive control showing the same action works for the identity allowed to do it
    (so a test cannot pass because nothing works at all).

Index: every attack of issue 8 and every TUF attack class that applies -> its test
    (sec/ = tests/security/, agent/ = tests/agent/; each on a real mosquitto, the agent
    ones on a real agent with real onnxruntime)

    arbitrary installation
      forged desired state (unsigned, unpinned key,   sec/test_agent_attacks.py::test_a_forged_desired_state_is_refused
        fleet key id with another signature)
      tampered manifest                               agent/test_daemon.py::test_bad_signature_is_refused
      manifest signed by an unpinned key              sec/test_agent_attacks.py::test_a_manifest_signed_by_an_unpinned_key_is_refused
      a device publishing a desired state or model    sec/test_identity.py::test_device_cannot_publish_a_desired_state_or_a_model
    endless data
      manifest over max_model_bytes                   agent/test_daemon.py::test_model_over_the_size_limit_is_refused_before_download
      chunk longer than declared (hash; size drop)    sec/test_agent_attacks.py::test_a_chunk_longer_than_declared_is_refused
      100 MB message over MQTT 3.1.1 and 5            sec/test_agent_wired.py::test_a_100_mb_message_is_dropped
      20 MB / just over the limit, desired, manifest  agent/test_message_limits.py
      60 MB HTTP JSON body (413, agent alive)         sec/test_agent_http.py::test_a_60_mb_json_body_is_refused_and_the_agent_keeps_serving
      HTTP connection cap, deadline, slow client      agent/test_http_limits.py
    extraneous dependencies
      desired state naming an unpublished model       sec/test_agent_attacks.py::test_a_desired_state_naming_an_unpublished_model_keeps_the_old_set
      too many slots or tiers                         sec/test_agent_attacks.py::test_a_deployment_with_too_many_slots_or_tiers_is_refused
    fast-forward
      huge signed seq followed, floor raised, older   sec/test_agent_attacks.py::test_a_huge_signed_seq_is_followed_and_raises_the_floor_for_good
        replay refused
    indefinite freeze
      expired desired state -> stale, desired_stale   agent/test_freshness.py::test_an_expired_desired_state_is_not_applied_and_reported_stale
      served desired state expiring                   agent/test_freshness.py::test_a_served_desired_state_that_expires_becomes_stale_within_its_period
      retained old desired state re-published         agent/test_freshness.py::test_a_replayed_desired_state_is_refused_and_changes_nothing
      another client consuming the device's session   sec/test_identity.py::test_device_cannot_take_over_another_devices_client_id
    malicious mirror
      tampered chunk refused, repaired chunk resumes  agent/test_daemon.py::test_corrupted_chunk_is_refused_then_repaired_chunk_completes
      found by verify, fixed by publish --repair      sec/test_tampering.py::test_tampered_retained_chunk_is_found_and_repaired
      a device waiting on it completes after --repair sec/test_agent_attacks.py::test_a_tampered_and_a_deleted_chunk_are_refused_until_publish_repair
      tampered manifest found and re-signed           sec/test_tampering.py::test_tampered_manifest_is_found_and_re_signed
    mix-and-match
      manifest of m@2 with the chunks of m@3          sec/test_agent_attacks.py::test_a_manifest_of_one_version_with_the_chunks_of_another_is_refused
      desired state for another device on this topic  sec/test_agent_attacks.py::test_a_desired_state_for_another_device_on_this_ones_topic_is_refused
      reading another device's desired state          sec/test_identity.py::test_device_cannot_read_another_devices_desired_state
    rollback
      older version without the rollback flag         agent/test_daemon.py::test_older_version_is_refused_and_a_signed_rollback_accepted
      replay on an intact device                      agent/test_freshness.py::test_a_replayed_desired_state_is_refused_and_changes_nothing
      replay after a corrupt desired.json/state.json  agent/test_freshness.py::test_the_floor_survives_a_corrupt_state_file
      replay onto a wiped store                       agent/test_freshness.py::test_a_wiped_store_refuses_desired_states_issued_before_its_enrolment
    key compromise
      revoked key refused, its model left for the     sec/test_agent_wired.py::test_a_revoked_key_is_refused_and_its_model_left
        last good; an older revocation list refused
      certificates, rotation, revocation lists        agent/test_keyring.py
      rotation, revocation across restarts, a forged  agent/test_revocation.py
        list, nothing left to fall back to
    wrong software
      io not what the signed manifest declares        sec/test_agent_attacks.py::test_a_model_whose_io_is_not_what_its_manifest_declares_is_refused
      failing smoke test / over the latency budget    agent/test_daemon.py::test_model_whose_smoke_test_fails_is_not_swapped_in (and ..._latency_budget_...)
      a model that fails to load                      agent/test_daemon.py::test_model_that_fails_to_load_is_not_swapped_in_nor_retried
    the issue's own attacks
      HTTP 4xx flood through a swap's watch window    agent/test_daemon_http_watch.py (latency check off)
        with the latency check on                     sec/test_agent_http.py::test_client_errors_during_a_swap_never_roll_it_back
        (and the latency noise a flood causes)        sec/test_agent_http.py::test_a_latency_rise_within_scheduling_noise_is_no_regression
      skewed host clock a year ahead: refused, floor  agent/test_freshness.py::test_a_desired_state_from_the_future_is_refused_without_moving_the_floor
        kept, the next honest one applies
      tampered stored model quarantined, next good    agent/test_freshness.py::test_a_tampered_stored_model_is_quarantined_at_start_and_the_device_falls_back
        deployment serves; re-checked before rollback agent/test_freshness.py::test_a_signed_rollback_re_checks_the_stored_file_first
      failed install keeps the download               agent/test_daemon.py::test_a_failed_install_keeps_the_download_and_the_retry_installs_it
      anonymous client; spoofing another's state      sec/test_identity.py
      agent over mutual TLS, another's certificate    sec/test_agent_identity.py
    fuzz (hypothesis, bounded)
      desired, manifest, chunk, revocation topics     sec/test_fuzz_topics.py
      the real agent's OIP endpoints                  sec/test_agent_http.py::test_fuzzed_requests_to_the_agent_get_a_4xx_and_it_keeps_serving
      the HTTP server's every endpoint                agent/test_http_limits.py::test_fuzzed_requests_get_an_answer_below_500_and_the_server_stays_up

Adding an attack
    On a real agent: the ``agent`` fixture (serving m@1, add 1.0) with ``rig``, ``watcher``
    and ``publisher`` from tests/agent/conftest.py (re-exported below), or
    ``module_agent`` for a fuzz. On the ACL: the module-scoped ``secure`` fixture (its broker is shared by the module: give
    your topics their own model name) or build a SecureFleet of your own; connect as an
    identity with ``securefleet.connect(secure.settings(user), client_id)``. The same
    roles on the embedded broker are tested in tests/host/fleet/test_broker_roles.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import models
import pytest
from securefleet import SecureFleet, at, load_agent_rig

from slimfleet.agent.signing import load_private_key
from slimfleet.host.fleet.keys import generate_keys

PREFIX = "slimfleet-sec"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    """A fleet with identities on mosquitto over mutual TLS, one per test module."""
    fleet = SecureFleet(Path(tmp_path_factory.mktemp("secure")), PREFIX)
    fleet.broker.start()
    yield fleet
    fleet.broker.stop()


_rig = load_agent_rig()
Rig, Watcher, Publisher = _rig.Rig, _rig.Watcher, _rig.Publisher
make_rig, rig, watcher_for, watcher = _rig.make_rig, _rig.rig, _rig.watcher_for, _rig.watcher
publisher_for, publisher, model_files = _rig.publisher_for, _rig.publisher, _rig.model_files


def serve_m1(rig, watcher, url: str, **extra):  # type: ignore[no-untyped-def]
    """Publish m@1 (add 1.0), start a real agent (HTTP on a free port), deploy m@1 at
    seq 1 and wait until it serves; the started agent."""
    rig.publish(models.add_const(1.0), 1)
    running = rig.agent(url, **extra)
    running.start()
    try:
        rig.assign(1)
        watcher.wait("state", at(1, "serving"))
    except BaseException:
        running.stop()
        raise
    return running


@pytest.fixture
def agent(mosquitto, rig, watcher):  # type: ignore[no-untyped-def]
    """A real agent serving m@1 (add 1.0) at seq 1 on the session's mosquitto."""
    running = serve_m1(rig, watcher, mosquitto.url)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def module_agent(mosquitto, tmp_path_factory, request):  # type: ignore[no-untyped-def]
    """``(rig, watcher, agent, root_key)``: one real agent serving m@1 (add 1.0) for a
    whole module (the fuzzes, whose examples are too many for an agent each), its topics
    the module's; it pins the fleet key and trusts ``root_key`` as its root."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    tmp = tmp_path_factory.mktemp(name)
    generate_keys(tmp / "root" / "root.key", tmp / "root" / "root.pub")
    rig = Rig(mosquitto.url, f"slimfleet-test/{name}", tmp)
    watcher = Watcher(mosquitto.url, rig.topics, rig.device, f"watch-{name}")
    try:
        running = serve_m1(
            rig, watcher, mosquitto.url, keys={"root": str(tmp / "root" / "root.pub")}
        )
        yield rig, watcher, running, load_private_key(tmp / "root" / "root.key")
        running.stop()
    finally:
        watcher.close()
        rig.close()
