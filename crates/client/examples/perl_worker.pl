#!/usr/bin/perl
# A worker in Perl (Debian's libgearman-client-perl) for jobs that Rust code submits:
#   perl perl_worker.pl 127.0.0.1:4730
# It serves "word_count": the payload is JSON {"text": "..."} (the shape gearbox's typed jobs
# send), the result is JSON {"words": N}. Uses only core Perl besides Gearman::Worker.
use strict;
use warnings;
use Gearman::Worker;

my $server = shift || '127.0.0.1:4730';
my $worker = Gearman::Worker->new(job_servers => [$server]);
$worker->register_function(word_count => sub {
    my $job = shift;
    my ($text) = $job->arg =~ /"text"\s*:\s*"((?:[^"\\]|\\.)*)"/ or die "no text in payload\n";
    my $words = () = $text =~ /\S+/g;
    return qq({"words":$words});
});
$worker->work while 1;
