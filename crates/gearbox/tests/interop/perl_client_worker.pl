#!/usr/bin/perl
# Perl Gearman::Client and Gearman::Worker (Debian libgearman-client-perl) against a server.
# Usage: perl_client_worker.pl HOST:PORT   — prints TAP, exits non-zero on any failure.
use strict;
use warnings;
use Gearman::Client;
use Gearman::Worker;
use POSIX ();

my $server = shift or die "usage: $0 HOST:PORT\n";
my ($tests, $failed) = (0, 0);
sub ok {
    my ($cond, $name) = @_;
    $tests++;
    print(($cond ? "ok" : "not ok") . " $tests - $name\n");
    $failed++ unless $cond;
}

my $pid = fork() // die "fork: $!";
if ($pid == 0) {
    my $worker = Gearman::Worker->new(job_servers => [$server]);
    $worker->register_function(reverse => sub { scalar reverse $_[0]->arg });
    $worker->register_function(progress => sub {
        my $job = shift;
        $job->set_status(1, 2);
        $job->set_status(2, 2);
        return "done:" . $job->arg;
    });
    $worker->register_function(explode => sub { die "kaboom\n" });
    $worker->register_function(fail => sub { return undef });
    $worker->work while 1;
    POSIX::_exit(0);
}

my $client = Gearman::Client->new(job_servers => [$server]);

my $res = $client->do_task(reverse => "hello");
ok($res && $$res eq "olleh", "do_task returns the worker's result");

my $bin = join("", map { chr } 0 .. 255);
$res = $client->do_task(reverse => $bin);
ok($res && $$res eq scalar(reverse $bin), "binary payload with NULs survives");

my @statuses;
$res = $client->do_task(progress => "p", { on_status => sub { push @statuses, "@_" } });
ok($res && $$res eq "done:p", "status-reporting job completes");
ok("@statuses" eq "1 2 2 2", "status updates reach the client (@statuses)");

my $failed_cb = 0;
$res = $client->do_task(explode => "x", { on_fail => sub { $failed_cb++ } });
ok(!defined $res && $failed_cb == 1, "a dying worker fails the job cleanly");
$failed_cb = 0;
$res = $client->do_task(fail => "x", { on_fail => sub { $failed_cb++ } });
ok(!defined $res && $failed_cb == 1, "a worker returning undef fails the job");

my $ts = $client->new_task_set;
my %got;
for my $i (1 .. 200) {
    $ts->add_task(reverse => "job$i", { on_complete => sub { $got{$i} = ${ $_[0] } } });
}
$ts->wait(timeout => 20);
ok(scalar(keys %got) == 200 && !grep({ $got{$_} ne reverse("job$_") } keys %got), "200 tasks in a task set");

my $handle = $client->dispatch_background(reverse => "bg", { uniq => "perl-bg-1" });
ok($handle, "background dispatch returns a handle");
my $deadline = time + 10;
my $status;
while (time < $deadline) {
    $status = $client->get_status($handle);
    last if $status && !$status->known;
    select(undef, undef, undef, 0.05);
}
ok($status && !$status->known, "background job runs and is forgotten");

kill 'KILL', $pid;
waitpid($pid, 0);
print "1..$tests\n";
exit($failed ? 1 : 0);
