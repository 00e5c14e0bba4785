<?php
// PHP's gearman extension (Debian php-gearman, on libgearman) against a server.
// Usage: php php_client_worker.php PORT — prints TAP, exits non-zero on any failure.
$port = (int)$argv[1];
$tests = 0;
$failed = 0;
function ok($cond, $name) {
    global $tests, $failed;
    $tests++;
    echo ($cond ? "ok" : "not ok"), " $tests - $name\n";
    if (!$cond) $failed++;
}

$pid = pcntl_fork();
if ($pid == 0) {
    $w = new GearmanWorker();
    $w->addServer("127.0.0.1", $port);
    $w->addFunction("phprev", function ($job) { return strrev($job->workload()); });
    $w->addFunction("phpfail", function ($job) { $job->sendFail(); return ""; });
    $w->addFunction("phpprogress", function ($job) {
        $job->sendStatus(1, 2);
        $job->sendData("partial-");
        return "done";
    });
    while ($w->work());
    exit(0);
}

$c = new GearmanClient();
$c->addServer("127.0.0.1", $port);
ok($c->doNormal("phprev", "hello") === "olleh", "doNormal returns the result");
ok($c->doHigh("phprev", "abc") === "cba", "doHigh");
ok($c->doLow("phprev", "xyz") === "zyx", "doLow");
$h = $c->doBackground("phprev", "bg", "php-unique-1");
ok($c->returnCode() == GEARMAN_SUCCESS && strpos($h, "H:") === 0, "doBackground returns a handle");
$c->doNormal("phpfail", "x");
ok($c->returnCode() == GEARMAN_WORK_FAIL, "a failing job reports WORK_FAIL");
ok($c->doNormal("phpprogress", "x") === "partial-done", "WORK_DATA then the result");
$n = 0;
$c->setCompleteCallback(function ($task) use (&$n) { if ($task->data() === strrev($task->unique())) $n++; });
for ($i = 0; $i < 100; $i++) {
    $c->addTask("phprev", "t$i", null, "t$i");
}
ok($c->runTasks() && $n == 100, "100 concurrent tasks ($n)");
$deadline = microtime(true) + 10;
do {
    $s = $c->jobStatus($h);
    if (!$s[0]) break;
    usleep(50000);
} while (microtime(true) < $deadline);
ok(!$s[0], "the background job ran and is forgotten");

posix_kill($pid, SIGKILL);
pcntl_waitpid($pid, $status);
echo "1..$tests\n";
exit($failed ? 1 : 0);
