"""Load: 200 workers long-polling at once are served without errors, and every task
submitted meanwhile goes to exactly one of them."""

import threading

from e2e import cluster  # noqa: F401  (fixture)

POLLERS = 200
TASKS = 100


def test_200_long_polling_workers_are_served(cluster):  # noqa: F811
    c = cluster(heartbeat_timeout="10m")  # these API-made workers send no heartbeat
    workers = [c.register(c.admin)[1] for _ in range(POLLERS)]
    got, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(POLLERS + 1)

    def poll(worker):
        start.wait()
        try:
            for _ in range(3):  # each holds a 2 s long poll up to three times
                reply = worker.api_reply("GET", "/workers/tasks", params={"wait": 2})
                assert reply.headers["X-Mito-Long-Poll"] == "30"
                if reply.data is not None:
                    c.finish(worker, reply.data)
                    with lock:
                        got.append(reply.data["uuid"])
        except Exception as error:  # the test reports every failure, not the first
            with lock:
                errors.append(repr(error))

    threads = [threading.Thread(target=poll, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    start.wait()
    answer = c.admin.api("POST", "/tasks/submit", {"tasks": [
        {"group_name": "mitosis_admin", "tags": [], "labels": [], "timeout": "1m",
         "priority": 0, "task_spec": {"args": ["true"]}}] * TASKS})
    submitted = {item["Ok"]["uuid"] for item in answer["results"]}
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:5]
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(got) == sorted(submitted), "each task exactly once"
    assert "Traceback" not in c.log()
