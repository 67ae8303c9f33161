#!/bin/sh
# Make the files docker-compose.yml reads its passwords from (compose `secrets:`),
# each with a new random password; a file that exists already is kept.
#   deploy/compose/make-secrets.sh [DIR]      (default: $DND_SECRETS_DIR or ./secrets)
# The folder is 0700 (nobody else on this host gets in); the files are 0644 so
# that the containers' users (dnd, redis, postgres) can read their bind mounts.
# In production edit redis_url to point at the chat application's own Redis.
set -eu
dir=${1:-${DND_SECRETS_DIR:-./secrets}}
mkdir -p "$dir"
chmod 700 "$dir"

password() {
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

write() {
    if [ -e "$dir/$1" ]; then
        echo "kept $dir/$1"
        return
    fi
    (umask 022 && printf '%s\n' "$2" > "$dir/$1")
    echo "wrote $dir/$1"
}

if [ -e "$dir/redis_password" ]; then
    redis=$(cat "$dir/redis_password")
else
    redis=$(password)
fi
write redis_password "$redis"
write postgres_password "$(password)"
write redis_url "redis://:$redis@redis:6379/0"
write celery_broker_url "redis://:$redis@redis:6379/1"
write celery_result_backend "redis://:$redis@redis:6379/2"
write flower_basic_auth "admin:$(password)"
